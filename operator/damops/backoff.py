"""When a retryable failure runs again: exponential backoff with jitter, capped.

Pure functions: the scheduler computes each failed attempt's delay here and
passes it to the database with the StatusUpdate (see ``store.complete_params``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Defaults for minutes-long asset operations: what usually fails them is a
# dependency (an object store, a transcoder service) that is out for seconds to
# minutes. 30 s, 1 min, 2 min, ... spreads the default 3 attempts over ~1.5 min
# and never waits more than 30 min between two attempts however high
# MAX_ATTEMPTS is set.
DEFAULT_BASE = 30.0
DEFAULT_MAX = 1800.0
DEFAULT_JITTER = 0.2


@dataclass(frozen=True)
class RetryPolicy:
    """delay(attempt) = min(max, base * 2**(attempt-1)), then +/- jitter (a fraction), capped again."""

    base: float = DEFAULT_BASE
    max: float = DEFAULT_MAX
    jitter: float = DEFAULT_JITTER

    @classmethod
    def from_settings(cls, settings: object) -> RetryPolicy:
        return cls(
            base=getattr(settings, "retry_backoff_base", DEFAULT_BASE),
            max=getattr(settings, "retry_backoff_max", DEFAULT_MAX),
            jitter=getattr(settings, "retry_backoff_jitter", DEFAULT_JITTER),
        )


DEFAULT_POLICY = RetryPolicy()


def backoff_delay(attempt: int, policy: RetryPolicy = DEFAULT_POLICY, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first)."""
    exponent = min(max(attempt, 1) - 1, 60)  # 2**60 s is already far past any cap
    delay = min(policy.max, policy.base * 2.0**exponent)
    # Jitter spreads the retries of a batch that failed together (the same outage).
    spread = delay * policy.jitter
    delay += (rng or random).uniform(-spread, spread)
    return float(max(0.0, min(policy.max, delay)))  # a float even for a policy given in ints


def retry_delay(attempt: int, asked: float | None, policy: RetryPolicy = DEFAULT_POLICY) -> float:
    """The trigger function's own request (``Retry(after=...)``) wins over the policy."""
    if asked is not None and asked == asked and asked >= 0:  # NaN and negatives fall back to the policy
        return min(float(asked), 366 * 86400.0)
    return backoff_delay(attempt, policy)
