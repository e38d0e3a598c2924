"""Start-up: how long a pool of N workers takes to be pre-heated (every worker free).

Each sample starts a Scheduler and a LocalSupervisor as ``damops run`` does and
times ``supervisor.start()`` -> the scheduler sees every worker free; then
stops them. Standalone:

    .venv/bin/python bench/startup.py --database-url URL [--workers 16] [--samples 3]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

from util import wait_until

from damops.config import Settings
from damops.db import migrate
from damops.local import LocalSupervisor
from damops.scheduler import Scheduler


async def one_start(url: str, workers: int, pool: str) -> float:
    secret = secrets.token_hex(16)
    settings = Settings(database_url=url, worker_count=workers, pool=pool, secret=secret)
    scheduler = Scheduler(settings, url, secret=secret)
    supervisor = LocalSupervisor(scheduler, workers, secret)
    await scheduler.start()
    started = time.monotonic()
    try:
        await supervisor.start()

        async def all_free() -> bool:
            return scheduler.snapshot().free == workers

        await wait_until(all_free, 0.005, 120, f"{workers} workers to be pre-heated")
        return time.monotonic() - started
    finally:
        await scheduler.stop(grace=5)
        await supervisor.stop()


async def run_startup(url: str, workers: int, samples: int, run_tag: str) -> dict[str, Any]:
    await asyncio.to_thread(migrate, url)
    seconds = [await one_start(url, workers, f"bench-start-{run_tag}-{i}") for i in range(samples)]
    return {
        "workers": workers,
        "samples_seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(statistics.median(seconds), 3),
        "max_seconds": round(max(seconds), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", required=True)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--samples", type=int, default=3)
    args = p.parse_args()
    result = asyncio.run(run_startup(args.database_url, args.workers, args.samples, str(int(time.time()))))
    print(result)


if __name__ == "__main__":
    main()
