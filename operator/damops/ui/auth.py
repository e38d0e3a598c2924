"""Who may act: read-only unless DAMOPS_UI_TOKEN is set.

The API takes ``Authorization: Bearer <token>``. The pages take a login form
that sets a signed session cookie (HttpOnly, SameSite=Strict); every form
that changes something carries a CSRF token derived from that session, and
its Origin (or Referer) must be the dashboard's own. Nothing is stored on the
server: the session and CSRF values are HMACs keyed by the token, so
changing the token logs everybody out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE = "damops_session"
SESSION_SECONDS = 12 * 3600


class Auth:
    def __init__(self, token: str | None) -> None:
        self.enabled = bool(token)
        self._token = token or ""
        self._key = hashlib.sha256(b"damops-ui:" + self._token.encode()).digest()

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, candidate: str | None) -> bool:
        return self.enabled and candidate is not None and hmac.compare_digest(candidate.encode(), self._token.encode())

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def new_session(self) -> str:
        sid = f"{int(time.time())}.{secrets.token_hex(16)}"
        return f"{sid}.{self._sign('session', sid)}"

    def session(self, request: Request) -> str | None:
        """The session id of a valid, unexpired login cookie, else None."""
        if not self.enabled:
            return None
        issued, _, rest = request.cookies.get(COOKIE, "").partition(".")
        nonce, _, signature = rest.partition(".")
        sid = f"{issued}.{nonce}"
        if not signature or not hmac.compare_digest(signature, self._sign("session", sid)):
            return None
        if not issued.isdigit() or time.time() - int(issued) > SESSION_SECONDS:
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return self._sign("csrf", sid)

    def csrf_ok(self, sid: str, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.csrf(sid).encode())


def same_origin(request: Request) -> bool:
    """The form came from this dashboard: its Origin, or failing that its
    Referer, names our own scheme and host. Neither sent: not same-origin."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return (parts.scheme, parts.netloc) == (request.url.scheme, request.url.netloc)
