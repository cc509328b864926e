"""Users, login sessions and API tokens (plain functions over a Session).

Secrets never reach the database: sessions and API tokens are stored as the sha256 of
the random token (a fast hash is enough for 256 random bits, unlike passwords), and
passwords arrive here already hashed (see :mod:`tzoo.web.security`). Functions that
write commit, like those in :mod:`tzoo.store.artefacts`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tzoo.store.models import (
    TOKEN_NAME_MAX_LENGTH,
    USERNAME_MAX_LENGTH,
    ApiToken,
    LoginSession,
    User,
)

SESSION_LIFETIME = timedelta(days=14)
# last_seen_at / last_used_at are refreshed at most this often, so that reading a page
# does not write to the database on every request.
TOUCH_INTERVAL = timedelta(minutes=5)
API_TOKEN_PREFIX = "tzoo_"
_DISPLAY_PREFIX_LENGTH = len(API_TOKEN_PREFIX) + 7
USERNAME_PATTERN = re.compile(rf"[a-z0-9_-]{{3,{USERNAME_MAX_LENGTH}}}")


class AccountError(ValueError):
    """A username or token name that breaks the rules; the message says which rule."""


class UsernameTakenError(AccountError):
    """Another account already has this username."""


def normalise_username(username: str) -> str:
    """Usernames are case-insensitive: ``Ada`` and ``ada`` are the same account."""
    return username.strip().lower()


def check_username(username: str) -> str:
    """The normalised username, or AccountError saying what a username may contain."""
    name = normalise_username(username)
    if not USERNAME_PATTERN.fullmatch(name):
        raise AccountError(
            f"A username is 3 to {USERNAME_MAX_LENGTH} characters: letters, digits, '_' and '-'."
        )
    return name


def token_digest(token: str) -> str:
    """The sha256 (hex) under which a session or API token is stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


# --- users ---------------------------------------------------------------------------


def create_user(
    session: Session, *, username: str, password_hash: str, is_admin: bool = False
) -> User:
    """Create an account and commit; UsernameTakenError when the name is taken (also when
    another request takes it at the same moment: the unique index decides)."""
    name = check_username(username)
    if get_user(session, name) is not None:
        raise UsernameTakenError(f"The username {name!r} is taken; pick another.")
    user = User(username=name, password_hash=password_hash, is_admin=is_admin)
    session.add(user)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise UsernameTakenError(f"The username {name!r} is taken; pick another.") from None
    return user


def get_user(session: Session, username: str) -> User | None:
    """The account with this username (any case), or None."""
    return session.scalar(select(User).where(User.username == normalise_username(username)))


def set_admin(session: Session, user: User, is_admin: bool) -> None:
    """Grant or take back the operator role."""
    user.is_admin = is_admin
    session.commit()


def list_users(session: Session) -> Sequence[User]:
    return session.scalars(select(User).order_by(User.id)).all()


def set_password_hash(session: Session, user: User, password_hash: str) -> None:
    """Replace the stored hash (a new password, or the same one with stronger parameters)."""
    user.password_hash = password_hash
    session.commit()


# --- login sessions ------------------------------------------------------------------


def start_login_session(session: Session, user: User) -> tuple[LoginSession, str]:
    """A new session for ``user`` and the token for its cookie (returned once, stored
    only as a hash). The user's expired sessions are cleared on the way."""
    now = _now()
    session.execute(
        delete(LoginSession).where(LoginSession.user_id == user.id, LoginSession.expires_at <= now)
    )
    token = secrets.token_urlsafe(32)
    row = LoginSession(
        token_hash=token_digest(token),
        user=user,
        csrf_token=secrets.token_urlsafe(32),
        expires_at=now + SESSION_LIFETIME,
        last_seen_at=now,
    )
    session.add(row)
    session.commit()
    return row, token


def find_login_session(session: Session, token: str) -> LoginSession | None:
    """The live session for a cookie's token, or None (unknown, logged out or expired)."""
    row = session.scalar(select(LoginSession).where(LoginSession.token_hash == token_digest(token)))
    if row is None:
        return None
    now = _now()
    if row.expires_at <= now:
        session.delete(row)
        session.commit()
        return None
    if now - row.last_seen_at >= TOUCH_INTERVAL:
        row.last_seen_at = now
        session.commit()
    return row


def end_login_session(session: Session, token: str) -> bool:
    """Log a browser out for good: its session row is deleted. False when there was none."""
    result = session.execute(
        delete(LoginSession).where(LoginSession.token_hash == token_digest(token))
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))


# --- API tokens ----------------------------------------------------------------------


def create_api_token(session: Session, user: User, name: str) -> tuple[ApiToken, str]:
    """A new personal token ``tzoo_<43 url-safe characters>`` and its stored row; the token
    itself exists only in the return value."""
    name = name.strip()
    if not 1 <= len(name) <= TOKEN_NAME_MAX_LENGTH:
        raise AccountError(f"A token name is 1 to {TOKEN_NAME_MAX_LENGTH} characters.")
    if not name.isprintable():
        raise AccountError("A token name cannot contain control characters.")
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        user=user,
        name=name,
        token_hash=token_digest(token),
        prefix=token[:_DISPLAY_PREFIX_LENGTH],
    )
    session.add(row)
    session.commit()
    return row, token


def list_api_tokens(session: Session, user: User) -> Sequence[ApiToken]:
    """The user's tokens, oldest first."""
    query = select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    return session.scalars(query).all()


def find_api_token(session: Session, token: str) -> ApiToken | None:
    """The stored token matching a Bearer token, or None; marks it used."""
    if not token.startswith(API_TOKEN_PREFIX):
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(token)))
    if row is None:
        return None
    now = _now()
    if row.last_used_at is None or now - row.last_used_at >= TOUCH_INTERVAL:
        row.last_used_at = now
        session.commit()
    return row


def revoke_api_token(session: Session, user: User, token_id: int) -> bool:
    """Delete one of the user's tokens; False when the user has no token with this id
    (someone else's token counts as none, so ids reveal nothing)."""
    result = session.execute(
        delete(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id)
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))
