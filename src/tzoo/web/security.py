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
from dataclasses import dataclass
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tzoo.config import Settings
from tzoo.service.quotas import MemoryQuotas, Quotas
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


class LoginThrottledError(Exception):
    """A login refused before its password was looked at: 429 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"Too many failed attempts; try again in {retry_after} seconds.")


@dataclass(frozen=True)
class LoginAttempt:
    """The hits one login reserved (see LoginLimiter.begin), to give back on success."""

    member: str
    keys: tuple[str, ...]
    pair_key: str


class LoginLimiter:
    """Slows password guessing without locking the owner out; counted by ``quotas``
    (shared by every process when they live in Redis).

    Each login *reserves* its attempt before the password is checked, in one atomic step
    per counter, and gives it back when the password was right: so the counters hold
    failures, and 20 parallel guesses cannot all see "one left" and all be tried.

    - **Per address** (``ip``): at most ``failures_per_ip`` failures within
      ``window_seconds``, whatever usernames they name; then every login from the
      address, right password or not, is 429 until the oldest failure leaves the window.
      One address trying 200 usernames is stopped after ``failures_per_ip``.
    - **Per account and address** (``pair``): an address's first ``failures_per_account``
      failures on one account come freely; each further attempt on that account from
      that address waits ``first_delay_s`` doubling per failure (5, 10, 20, then 30 s at
      most, ``max_delay_s``) after its previous one. A sprayer slows to one guess in 30 s;
      nobody waits longer than 30 s for a failure of their own address.
    - **Per account** (``account``): failures on the account from all addresses. When
      the *other* addresses have together failed ``failures_per_account`` times (a spray
      from many addresses), the free allowance ends for every address that has failed
      on the account: the delays start at its first failure.

    An address that has not failed on an account within the window is never slowed by
    that account's counters, so the owner logging in from their own address gets in at
    once however hard others spray (only their own address's failures, or more than
    ``failures_per_ip`` of them, can make them wait). A successful login forgets its
    address's failures on that account (not its per-address failures: an attacker
    cannot wash those by logging into an account of their own).

    Usernames enter keys hashed (their length and characters are the caller's).
    """

    def __init__(
        self,
        quotas: Quotas | None = None,
        *,
        failures_per_account: int = 10,
        failures_per_ip: int = 20,
        window_seconds: float = 300,
        first_delay_s: float = 5,
        max_delay_s: float = 30,
    ) -> None:
        self.quotas = quotas if quotas is not None else MemoryQuotas()
        self.failures_per_account = failures_per_account
        self.failures_per_ip = failures_per_ip
        self.window_seconds = window_seconds
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s

    @classmethod
    def from_settings(cls, settings: Settings, quotas: Quotas | None = None) -> LoginLimiter:
        return cls(
            quotas,
            failures_per_account=settings.login_failures_per_account,
            failures_per_ip=settings.login_failures_per_ip,
            window_seconds=settings.login_window_seconds,
        )

    def begin(self, username: str, address: str) -> LoginAttempt:
        """Reserve one attempt of ``address`` on ``username`` (already normalised), or
        raise LoginThrottledError (nothing reserved) with the seconds to wait."""
        account = hashlib.sha256(username.encode()).hexdigest()[:32]
        ip_key = f"login:ip:{address}"
        pair_key = f"login:pair:{account}:{address}"
        account_key = f"login:account:{account}"
        member = secrets.token_hex(8)
        quotas, window = self.quotas, self.window_seconds
        wait = quotas.hit(ip_key, self.failures_per_ip, window, member=member)
        if wait is not None:
            raise LoginThrottledError(wait)
        others = quotas.count(account_key, window) - quotas.count(pair_key, window)
        sprayed = others >= self.failures_per_account
        wait = quotas.hit_spaced(
            pair_key,
            free=1 if sprayed else self.failures_per_account,
            window_s=window,
            first_delay_s=self.first_delay_s,
            max_delay_s=self.max_delay_s,
            member=member,
        )
        if wait is not None:
            quotas.give_back(ip_key, member)
            raise LoginThrottledError(wait)
        quotas.hit(account_key, None, window, member=member)
        return LoginAttempt(member, (ip_key, pair_key, account_key), pair_key)

    def succeeded(self, attempt: LoginAttempt) -> None:
        """The password was right: the attempt is no failure, and its address's earlier
        failures on this account are forgotten."""
        for key in attempt.keys:
            self.quotas.give_back(key, attempt.member)
        self.quotas.clear(attempt.pair_key)

    def failed(self, attempt: LoginAttempt) -> None:
        """The password was wrong: the reservation stays counted as a failure."""


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
