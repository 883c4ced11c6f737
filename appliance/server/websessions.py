"""Dashboard logins: server-side sessions behind an HttpOnly cookie, and CSRF tokens for forms.

Why in memory: a session is a convenience over a token the user holds anyway; a restart of the
appliance logs everybody out, which is acceptable and means no session secret ever reaches the disk.
The store keeps only SHA-256 of each session id (a memory dump does not hand out live cookies) and
the SHA-256 of the token used to log in, never the token: every request re-checks that token, so
revoking it (`ihb token revoke`) ends its dashboard sessions at once.

Cookies are ``HttpOnly; Secure; SameSite=Strict; Path=/``. Every POST form carries a CSRF token bound
to the session (compared in constant time); the login form, which has no session yet, uses a
double-submit cookie. Sessions expire after an idle time and, whatever the activity, after 12 hours.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from .http import Request

COOKIE = "ihb_session"
LOGIN_COOKIE = "ihb_login"
MAX_LIFETIME = 12 * 3600.0
MAX_SESSIONS = 10_000  # beyond this the oldest sessions are dropped (a login flood cannot exhaust memory)


def _digest(sid: str) -> bytes:
    return hashlib.sha256(sid.encode()).digest()


@dataclass
class WebSession:
    token_digest: bytes
    role: str
    tenant: str
    token_id: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    def __init__(self, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = idle_seconds
        self.clock = clock
        self._by_digest: dict[bytes, WebSession] = {}

    def create(self, token_digest: bytes, role: str, tenant: str, token_id: str) -> tuple[str, WebSession]:
        self._expire()
        while len(self._by_digest) >= MAX_SESSIONS:
            oldest = min(self._by_digest, key=lambda k: self._by_digest[k].last_seen)
            del self._by_digest[oldest]
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        ws = WebSession(token_digest, role, tenant, token_id, secrets.token_urlsafe(32), now, now)
        self._by_digest[_digest(sid)] = ws
        return sid, ws

    def get(self, sid: str | None) -> WebSession | None:
        """The live session for this cookie value (its idle timer restarts), or None."""
        if not sid or len(sid) > 128:
            return None
        d = _digest(sid)
        ws = self._by_digest.get(d)
        if ws is None:
            return None
        now = self.clock()
        if now - ws.last_seen > self.idle or now - ws.created > MAX_LIFETIME:
            del self._by_digest[d]
            return None
        ws.last_seen = now
        return ws

    def end(self, sid: str | None) -> None:
        if sid:
            self._by_digest.pop(_digest(sid), None)

    def _expire(self) -> None:
        now = self.clock()
        for d in [d for d, ws in self._by_digest.items()
                  if now - ws.last_seen > self.idle or now - ws.created > MAX_LIFETIME]:
            del self._by_digest[d]


def cookies(req: Request) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(req.header("cookie"))
    except CookieError:
        return {}
    return {k: m.value for k, m in jar.items()}


def set_cookie(name: str, value: str, max_age: int | None = None) -> tuple[str, str]:
    age = f"; Max-Age={max_age}" if max_age is not None else ""
    return ("set-cookie", f"{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}")


def clear_cookie(name: str) -> tuple[str, str]:
    return set_cookie(name, "", 0)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two form/cookie tokens; a missing one never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())
