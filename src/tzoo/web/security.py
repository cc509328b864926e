"""Security primitives of the web layer: password hashing, cookies, CSRF tokens, a login
attempt limiter and safe redirects. No routes and no database here (see deps.py).

CSRF, in short: a logged-in browser's session row holds a random ``csrf_token`` that
forms send as the ``csrf_token`` field and scripts as the ``X-CSRF-Token`` header
(pages carry it in ``<meta name="csrf-token">``). Anonymous visitors have no session row;
their forms (log in, sign up) use a double-submit token instead: a random nonce in the
form and the same nonce, signed with ``settings.secret_key``, in the ``tzoo_csrf``
cookie. Requests with ``Authorization: Bearer`` carry no ambient credentials and need
no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tzoo.config import Settings
from tzoo.store.accounts import SESSION_LIFETIME

SESSION_COOKIE = "tzoo_session"
CSRF_COOKIE = "tzoo_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
CSRF_COOKIE_MAX_AGE = 24 * 3600
PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 256

# argon2id with argon2-cffi's defaults (RFC 9106's second recommendation). Tests swap in
# a cheaper hasher by replacing this attribute; every function below reads it at call time.
PASSWORD_HASHER = PasswordHasher()

# request.scope["state"] key under which a freshly minted anonymous CSRF cookie waits for
# CsrfCookieMiddleware to send it.
PENDING_CSRF_COOKIE = "tzoo_pending_csrf_cookie"


class PasswordRuleError(ValueError):
    """A new password that breaks the length rules; the message says which."""


# --- passwords -----------------------------------------------------------------------


def check_new_password(password: str) -> None:
    """Length rules only: long passphrases are welcome, composition rules are not."""
    if not PASSWORD_MIN_LENGTH <= len(password) <= PASSWORD_MAX_LENGTH:
        raise PasswordRuleError(
            f"A password is {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters."
        )


def hash_password(password: str) -> str:
    """An argon2id PHC string (salt and parameters included)."""
    return PASSWORD_HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches; a malformed stored hash counts as a mismatch."""
    try:
        return PASSWORD_HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters than the current hasher's, so a
    successful login should store a fresh hash."""
    try:
        return PASSWORD_HASHER.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


_dummy_hashes: dict[int, str] = {}


def verify_nothing(password: str) -> None:
    """Spend the time of one verification, for logins naming no account, so response
    times do not reveal which usernames exist."""
    key = id(PASSWORD_HASHER)
    if key not in _dummy_hashes:
        _dummy_hashes[key] = PASSWORD_HASHER.hash(secrets.token_urlsafe(16))
    verify_password(_dummy_hashes[key], password)


# --- CSRF ----------------------------------------------------------------------------


def tokens_match(submitted: str | None, expected: str | None) -> bool:
    """Constant-time comparison; a missing token never matches."""
    if not submitted or not expected:
        return False
    return hmac.compare_digest(submitted.encode(), expected.encode())


def new_csrf_nonce() -> str:
    return secrets.token_urlsafe(32)


def sign_csrf_nonce(nonce: str, secret_key: str) -> str:
    """The cookie value for an anonymous CSRF nonce: ``nonce.signature``."""
    return f"{nonce}.{_signature(nonce, secret_key)}"


def nonce_from_cookie(cookie: str | None, secret_key: str) -> str | None:
    """The nonce of a cookie this server signed, or None (missing, forged, malformed)."""
    if not cookie or "." not in cookie:
        return None
    nonce, _, signature = cookie.rpartition(".")
    return nonce if tokens_match(signature, _signature(nonce, secret_key)) else None


def _signature(nonce: str, secret_key: str) -> str:
    message = b"tzoo-anonymous-csrf:" + nonce.encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


# --- cookies -------------------------------------------------------------------------


def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    """HttpOnly (scripts never see it), SameSite=Lax (not sent on cross-site POSTs),
    Secure when the site is served over HTTPS."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.cookies_secure,
    )


def clear_cookie(response: Response, name: str, settings: Settings) -> None:
    response.delete_cookie(
        name, path="/", httponly=True, samesite="lax", secure=settings.cookies_secure
    )


def csrf_cookie_header(value: str, settings: Settings) -> str:
    """The Set-Cookie header value of an anonymous CSRF cookie."""
    carrier = Response()
    carrier.set_cookie(
        CSRF_COOKIE,
        value,
        max_age=CSRF_COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.cookies_secure,
    )
    return carrier.headers["set-cookie"]


class CsrfCookieMiddleware:
    """Sends the anonymous CSRF cookie when rendering a page minted a new nonce.

    The nonce is minted inside template rendering (the ``csrf_token`` context variable),
    where no response exists yet to set a cookie on; the minted cookie waits in the
    request's state and is added to the response headers here.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Create the state dict here so that routes, even on a copied scope, share it.
        state = scope.setdefault("state", {})

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and state.get(PENDING_CSRF_COOKIE):
                headers = MutableHeaders(scope=message)
                headers.append(
                    "set-cookie", csrf_cookie_header(state[PENDING_CSRF_COOKIE], self.settings)
                )
            await send(message)

        await self.app(scope, receive, send_with_cookie)


# --- login attempts ------------------------------------------------------------------


class LoginLimiter:
    """At most ``max_failures`` failed logins per key (client address + username) within
    ``window_seconds``; then logins for that key are refused until the oldest failure
    leaves the window, even with the right password.

    In memory and per process: it slows guessing against one server process; several
    workers each keep their own count. The number of keys is capped (oldest dropped) so
    a flood of usernames cannot exhaust memory.
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window_seconds: float = 300,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> int | None:
        """Seconds to wait before this key may try again, or None when it may now."""
        with self._lock:
            failures = self._recent(key) if key in self._failures else deque()
            if len(failures) < self.max_failures:
                return None
            return max(1, int(failures[0] + self.window_seconds - self._clock()) + 1)

    def failed(self, key: str) -> None:
        with self._lock:
            self._recent(key).append(self._clock())
            self._failures.move_to_end(key)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        cutoff = self._clock() - self.window_seconds
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return failures


# --- redirects -----------------------------------------------------------------------


def safe_next(target: str | None, default: str = "/") -> str:
    """``target`` when it is a path on this site, else ``default``: never an absolute
    URL, a scheme-relative ``//host`` or a backslash trick browsers read as one."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return default
    if "\\" in target or not target.isprintable():
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target
