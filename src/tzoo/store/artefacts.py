"""Create, read, list and delete stored artefacts (plain functions over a Session)."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from tzoo.store.codec import Precision, decode_arrays, encode_arrays
from tzoo.store.models import (
    KIND_MAX_LENGTH,
    LOOKUP_KEY_LENGTH,
    MODEL_NAME_MAX_LENGTH,
    PART_NAME_MAX_LENGTH,
    SLUG_LENGTH,
    VISIBILITIES,
    Artefact,
    ArtefactPart,
)

# Letters and digits only: a slug never starts with "-" (which a CLI would read as an
# option) and needs no escaping anywhere. 62**11 is about 2**65 slugs.
_SLUG_ALPHABET = string.ascii_letters + string.digits
_SLUG_ATTEMPTS = 5
MAX_LIST_LIMIT = 500


class SlugCollisionError(RuntimeError):
    """No free slug was found after several attempts (practically impossible)."""


def new_slug() -> str:
    """A random, URL-safe permalink id."""
    return "".join(secrets.choice(_SLUG_ALPHABET) for _ in range(SLUG_LENGTH))


def create_artefact(
    session: Session,
    *,
    kind: str,
    model_name: str,
    input_text: str,
    params: dict[str, Any],
    arrays: dict[str, np.ndarray],
    precision: Precision = "float16",
    owner: str | None = None,
    visibility: str = "public",
    parts: dict[str, dict[str, np.ndarray]] | None = None,
    lookup_key: str | None = None,
) -> Artefact:
    """Encode ``arrays`` (see :mod:`tzoo.store.codec`), store them with a fresh slug, commit.

    Commits the session, like the FastAPI template's crud functions. A slug that is
    already taken is replaced by a new one, both when seen before the insert and when
    another writer takes it at the same moment (unique index violation; the session is
    rolled back and the insert retried, so pass a session with no other pending work).

    ``lookup_key``: a content key, unique per kind (``find_artefact``). When an artefact
    of this kind already has it (another writer stored the same result first), that one
    is returned and nothing new is stored.
    """
    _check_kind(kind)
    if lookup_key is not None and not 0 < len(lookup_key) <= LOOKUP_KEY_LENGTH:
        raise ValueError(f"lookup_key must be 1 to {LOOKUP_KEY_LENGTH} characters")
    _check_visibility(visibility)
    if not model_name or len(model_name) > MODEL_NAME_MAX_LENGTH:
        raise ValueError(
            f"model_name must be 1 to {MODEL_NAME_MAX_LENGTH} characters, got {model_name!r}"
        )
    _check_params(params)
    blob = encode_arrays(arrays, precision=precision)
    encoded_parts = {
        _checked_part_name(name): encode_arrays(part, precision=precision)
        for name, part in (parts or {}).items()
    }
    for _ in range(_SLUG_ATTEMPTS):
        slug = new_slug()
        if _slug_taken(session, slug):
            continue
        artefact = Artefact(
            slug=slug,
            kind=kind,
            model_name=model_name,
            input_text=input_text,
            params=params,
            blob=blob,
            blob_bytes=len(blob),
            owner=owner,
            visibility=visibility,
            lookup_key=lookup_key,
            parts=[
                ArtefactPart(name=name, blob=part_blob, blob_bytes=len(part_blob))
                for name, part_blob in encoded_parts.items()
            ],
        )
        session.add(artefact)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if lookup_key is not None:
                existing = find_artefact(session, kind, lookup_key)
                if existing is not None:
                    return existing
            if not _slug_taken(session, slug):
                raise  # some other constraint failed: not ours to retry
            continue
        return artefact
    raise SlugCollisionError(f"no free slug found after {_SLUG_ATTEMPTS} attempts")


def get_artefact(session: Session, slug: str) -> Artefact | None:
    """The artefact with this slug, arrays included, or None."""
    return session.scalar(
        select(Artefact).where(Artefact.slug == slug).options(undefer(Artefact.blob))
    )


def find_artefact(session: Session, kind: str, lookup_key: str) -> Artefact | None:
    """The artefact of ``kind`` stored with ``lookup_key``, arrays included, or None."""
    return session.scalar(
        select(Artefact)
        .where(Artefact.kind == kind, Artefact.lookup_key == lookup_key)
        .options(undefer(Artefact.blob))
    )


def load_arrays(artefact: Artefact) -> dict[str, np.ndarray]:
    """The artefact's arrays, decoded to their original names, shapes and dtypes."""
    return decode_arrays(artefact.blob)


def load_part(session: Session, artefact: Artefact, name: str) -> dict[str, np.ndarray] | None:
    """One part of an artefact, decoded; None when it has no part of that name."""
    blob = session.scalar(
        select(ArtefactPart.blob).where(
            ArtefactPart.artefact_id == artefact.id, ArtefactPart.name == name
        )
    )
    return None if blob is None else decode_arrays(blob)


def part_names(session: Session, artefact: Artefact) -> list[str]:
    """Names of the artefact's parts, in the order they were stored."""
    query = (
        select(ArtefactPart.name)
        .where(ArtefactPart.artefact_id == artefact.id)
        .order_by(ArtefactPart.id)
    )
    return list(session.scalars(query))


def stored_bytes(session: Session, artefact: Artefact) -> int:
    """Bytes the artefact takes in the database: its blob plus all its parts."""
    parts = session.scalar(
        select(func.coalesce(func.sum(ArtefactPart.blob_bytes), 0)).where(
            ArtefactPart.artefact_id == artefact.id
        )
    )
    return artefact.blob_bytes + int(parts or 0)


def list_artefacts(
    session: Session,
    *,
    kind: str | None = None,
    model_name: str | None = None,
    visibility: str | None = "public",
    text_contains: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Sequence[Artefact]:
    """Artefacts newest first, without their arrays. ``visibility=None`` lists all;
    ``text_contains`` keeps those whose input text contains it (case-insensitive)."""
    if visibility is not None:
        _check_visibility(visibility)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, not {offset}")
    query = select(Artefact)
    if kind is not None:
        query = query.where(Artefact.kind == kind)
    if model_name is not None:
        query = query.where(Artefact.model_name == model_name)
    if visibility is not None:
        query = query.where(Artefact.visibility == visibility)
    if text_contains:
        pattern = "%" + _escape_like(text_contains) + "%"
        query = query.where(Artefact.input_text.ilike(pattern, escape="\\"))
    query = query.order_by(Artefact.created_at.desc(), Artefact.id.desc())
    return session.scalars(query.limit(limit).offset(offset)).all()


def delete_artefact(session: Session, slug: str) -> bool:
    """Delete the artefact with this slug and commit; False when there was none."""
    artefact = session.scalar(select(Artefact).where(Artefact.slug == slug))
    if artefact is None:
        return False
    session.delete(artefact)
    session.commit()
    return True


def _escape_like(text: str) -> str:
    """Make % and _ in user text match themselves in a LIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _slug_taken(session: Session, slug: str) -> bool:
    return bool(session.scalar(select(exists().where(Artefact.slug == slug))))


def _checked_part_name(name: str) -> str:
    if not name or len(name) > PART_NAME_MAX_LENGTH:
        raise ValueError(f"part names must be 1 to {PART_NAME_MAX_LENGTH} characters, got {name!r}")
    return name


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError("kind must be a non-empty string, e.g. 'attention'")
    if len(kind) > KIND_MAX_LENGTH:
        raise ValueError(f"kind must be at most {KIND_MAX_LENGTH} characters, got {len(kind)}")


def _check_visibility(visibility: str) -> None:
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, not {visibility!r}")


def _check_params(params: dict[str, Any]) -> None:
    """Refuse params the JSON column would choke on, with a message instead of a DB error."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict, got {type(params).__name__}")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"params must be JSON-serialisable ({error})") from None
