"""Who may see and change a stored visualization.

Public and unlisted artefacts are readable by anyone with the link (unlisted ones are
only left out of listings); private ones by their owner alone. Everyone else gets the
same 404 as for a link that never existed, so a private slug reveals nothing. Only the
owner (``Artefact.owner`` is the owner's username) changes or deletes an artefact.
"""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from tzoo.store.models import Artefact, User

NOT_FOUND = "No visualization at this link."
NOT_OWNER = "Only the owner of this visualization can change or delete it."


def is_owner(artefact: Artefact, user: User | None) -> bool:
    return user is not None and artefact.owner is not None and artefact.owner == user.username


def can_view(artefact: Artefact, user: User | None) -> bool:
    return artefact.visibility != "private" or is_owner(artefact, user)


def visible_artefact(session: Session, slug: str, user: User | None) -> Artefact:
    """The artefact at ``slug`` if ``user`` (None: anonymous) may see it, else 404.

    Its arrays (``blob``) are deferred: they load on first access, while the session is
    open, so checks that only need the row stay cheap.
    """
    artefact = session.scalar(select(Artefact).where(Artefact.slug == slug))
    if artefact is None or not can_view(artefact, user):
        raise HTTPException(404, NOT_FOUND)
    return artefact


def owned_artefact(session: Session, slug: str, user: User | None) -> Artefact:
    """The artefact at ``slug`` if ``user`` owns it: 404 when they cannot see it at all,
    403 when they can see it but it is not theirs."""
    artefact = visible_artefact(session, slug, user)
    if not is_owner(artefact, user):
        raise HTTPException(403, NOT_OWNER)
    return artefact
