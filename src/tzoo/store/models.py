"""ORM tables of the store. Column types are chosen to mean the same on SQLite and PostgreSQL.

Schema changes go through a new Alembic revision in ``store/migrations/versions``; keep
this module and the latest revision in step (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

Visibility = Literal["public", "unlisted", "private"]
VISIBILITIES: tuple[str, ...] = get_args(Visibility)

SLUG_LENGTH = 11
KIND_MAX_LENGTH = 64
LOOKUP_KEY_LENGTH = 64  # a sha256 in hex
MODEL_NAME_MAX_LENGTH = 255

# Stable constraint names, so later migrations (batch mode on SQLite) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL: unlike json it supports equality, DISTINCT and indexing.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware in UTC.

    SQLite has no time zones and returns naive values (its CURRENT_TIMESTAMP is UTC);
    PostgreSQL returns timestamptz in the session's zone. Both are normalised to UTC here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Artefact(Base):
    """One stored analysis result: a small row plus the encoded arrays (see codec)."""

    __tablename__ = "artefacts"
    __table_args__ = (
        CheckConstraint(
            "visibility IN ('public', 'unlisted', 'private')", name="visibility_allowed"
        ),
        Index("ix_artefacts_kind_lookup_key", "kind", "lookup_key", unique=True),
    )
    # Load server-side defaults (created_at) right after INSERT, via RETURNING.
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(KIND_MAX_LENGTH), index=True)
    model_name: Mapped[str] = mapped_column(String(MODEL_NAME_MAX_LENGTH), index=True)
    input_text: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Deferred: listings never need the (possibly megabytes of) arrays.
    blob: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    blob_bytes: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    visibility: Mapped[str] = mapped_column(String(16), default="public", server_default="public")
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=func.now(), index=True
    )
    # A content key (e.g. a hash of what a dashboard was built from), unique per kind, for
    # results that are stored once and found again; None for most artefacts.
    lookup_key: Mapped[str | None] = mapped_column(String(LOOKUP_KEY_LENGTH), nullable=True)

    parts: Mapped[list[ArtefactPart]] = relationship(
        back_populates="artefact", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"<Artefact {self.slug} kind={self.kind!r} model={self.model_name!r}>"


PART_NAME_MAX_LENGTH = 128


class ArtefactPart(Base):
    """A separately loadable piece of an artefact (e.g. one layer's attention), so a large
    result is read one piece at a time instead of decoding everything per request."""

    __tablename__ = "artefact_parts"
    __table_args__ = (UniqueConstraint("artefact_id", "name", name="uq_artefact_parts_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artefact_id: Mapped[int] = mapped_column(
        ForeignKey("artefacts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(PART_NAME_MAX_LENGTH))
    blob: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    blob_bytes: Mapped[int] = mapped_column(Integer)

    artefact: Mapped[Artefact] = relationship(back_populates="parts")


# --- accounts ------------------------------------------------------------------------

USERNAME_MAX_LENGTH = 32
TOKEN_HASH_LENGTH = 64  # sha256, hex
TOKEN_PREFIX_LENGTH = 16
TOKEN_NAME_MAX_LENGTH = 100


class User(Base):
    """An account. ``username`` is stored lowercased, so lookups are case-insensitive and
    ``Artefact.owner`` (a username) compares with ``==``."""

    __tablename__ = "users"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX_LENGTH), unique=True, index=True)
    # An argon2id PHC string ("$argon2id$v=19$m=...,t=...,p=...$salt$hash").
    password_hash: Mapped[str] = mapped_column(String(255))
    # An operator: may load, unload and switch models for everyone. Only the CLI
    # (`tzoo users create --admin`, `tzoo users admin`) grants it, never the web.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())

    def __repr__(self) -> str:
        return f"<User {self.username!r}{' admin' if self.is_admin else ''}>"


class LoginSession(Base):
    """A browser's logged-in session. Only the sha256 of the cookie's token is kept, so a
    database leak does not hand out sessions; deleting the row logs the browser out."""

    __tablename__ = "login_sessions"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(TOKEN_HASH_LENGTH), unique=True, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(TOKEN_HASH_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())

    user: Mapped[User] = relationship(lazy="joined")


class ApiToken(Base):
    """A personal API token for the REST API (``Authorization: Bearer tzoo_...``). Only its
    sha256 and a short display prefix are stored; the token itself is shown once."""

    __tablename__ = "api_tokens"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(TOKEN_NAME_MAX_LENGTH))
    token_hash: Mapped[str] = mapped_column(String(TOKEN_HASH_LENGTH), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(TOKEN_PREFIX_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship(lazy="joined")


# --- annotations ---------------------------------------------------------------------

ANNOTATION_BODY_MAX_LENGTH = 5000
STACK_MAX_LENGTH = 16


class Annotation(Base):
    """A comment on a visualization, anchored to (stack, layer, head, token range), each
    part optional. Replies point at their parent (any depth) and share its anchor. A
    deleted comment that still has replies stays as a placeholder (``deleted``, empty
    body) so the thread keeps its shape. ``body`` is stored as typed: escaping is the
    renderer's job."""

    __tablename__ = "annotations"
    __table_args__ = (
        CheckConstraint("layer IS NULL OR layer >= 0", name="layer_not_negative"),
        CheckConstraint("head IS NULL OR head >= 0", name="head_not_negative"),
        CheckConstraint(
            "(token_start IS NULL AND token_end IS NULL) OR "
            "(token_start >= 0 AND token_end >= token_start)",
            name="token_range_ordered",
        ),
    )
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artefact_id: Mapped[int] = mapped_column(
        ForeignKey("artefacts.id", ondelete="CASCADE"), index=True
    )
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotations.id", ondelete="CASCADE"), nullable=True, index=True
    )
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    body: Mapped[str] = mapped_column(Text)
    stack: Mapped[str | None] = mapped_column(String(STACK_MAX_LENGTH), nullable=True)
    layer: Mapped[int | None] = mapped_column(Integer, nullable=True)
    head: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token_end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    author: Mapped[User] = relationship(lazy="joined")
    artefact: Mapped[Artefact] = relationship()
