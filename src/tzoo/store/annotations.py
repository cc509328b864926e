"""Threaded comments on visualizations (plain functions over a Session).

A comment is anchored to a place in the visualization: a stack (``encoder``, ``decoder``,
``cross``...), a layer, a head and a token range, each optional (no anchor: the whole
visualization). Replies may nest to any depth; a reply always shares its thread's anchor,
so filtering by anchor returns whole threads. Deleting a comment that has replies leaves
a placeholder (``deleted``, empty body) so the replies keep their place; deleting one
without replies removes it, and then any placeholder left with no replies.

Bodies are stored exactly as typed; escaping belongs to whoever renders them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from tzoo.store.models import (
    ANNOTATION_BODY_MAX_LENGTH,
    STACK_MAX_LENGTH,
    Annotation,
    Artefact,
    User,
)

_STACK_PATTERN = re.compile(rf"[A-Za-z0-9_.-]{{1,{STACK_MAX_LENGTH}}}")


class AnnotationError(ValueError):
    """A comment that cannot be stored as asked; the message says why."""


@dataclass(frozen=True)
class Anchor:
    """Where a comment points; None parts mean "anywhere"."""

    stack: str | None = None
    layer: int | None = None
    head: int | None = None
    token_start: int | None = None
    token_end: int | None = None

    @classmethod
    def of(cls, annotation: Annotation) -> Anchor:
        return cls(
            annotation.stack,
            annotation.layer,
            annotation.head,
            annotation.token_start,
            annotation.token_end,
        )

    @property
    def is_empty(self) -> bool:
        return self == Anchor()


class Threaded(NamedTuple):
    """A comment and how deeply it is nested (0: starts a thread)."""

    annotation: Annotation
    depth: int


def create_annotation(
    session: Session,
    artefact: Artefact,
    author: User,
    body: str,
    *,
    anchor: Anchor | None = None,
    parent_id: int | None = None,
) -> Annotation:
    """Store a comment (or a reply to ``parent_id``) and commit. Raises AnnotationError
    for an empty or overlong body, an anchor outside the visualization (checked against
    ``n_layers``, ``n_heads`` and ``n_tokens`` in its params when present), or a parent
    that is not a live comment on the same visualization."""
    anchor = anchor or Anchor()
    check_body(body)
    if parent_id is not None:
        anchor = _reply_anchor(session, artefact, parent_id, anchor)
    check_anchor(anchor, artefact.params)
    annotation = Annotation(
        artefact_id=artefact.id, parent_id=parent_id, author=author, body=body, **asdict(anchor)
    )
    session.add(annotation)
    session.commit()
    return annotation


def get_annotation(session: Session, annotation_id: int) -> Annotation | None:
    return session.get(Annotation, annotation_id)


def list_annotations(
    session: Session,
    artefact: Artefact,
    *,
    stack: str | None = None,
    layer: int | None = None,
    head: int | None = None,
) -> list[Threaded]:
    """The visualization's comments in reading order: each thread's root, then its replies
    depth first, oldest first at every level. Filters keep whole threads (replies share
    their root's anchor)."""
    query = select(Annotation).where(Annotation.artefact_id == artefact.id)
    if stack is not None:
        query = query.where(Annotation.stack == stack)
    if layer is not None:
        query = query.where(Annotation.layer == layer)
    if head is not None:
        query = query.where(Annotation.head == head)
    return thread_order(session.scalars(query.order_by(Annotation.id)).all())


def thread_order(annotations: Sequence[Annotation]) -> list[Threaded]:
    """Depth-first order of ``annotations`` (given oldest first), without recursion so a
    deep thread cannot exhaust the stack."""
    ids = {a.id for a in annotations}
    children: dict[int | None, list[Annotation]] = {}
    for annotation in annotations:
        parent = annotation.parent_id if annotation.parent_id in ids else None
        children.setdefault(parent, []).append(annotation)
    ordered: list[Threaded] = []
    pending = [Threaded(a, 0) for a in reversed(children.get(None, []))]
    while pending:
        item = pending.pop()
        ordered.append(item)
        replies = children.get(item.annotation.id, [])
        pending.extend(Threaded(a, item.depth + 1) for a in reversed(replies))
    return ordered


def edit_annotation(session: Session, annotation: Annotation, body: str) -> Annotation:
    """Replace the body and commit; the anchor and the thread stay as they are."""
    if annotation.deleted:
        raise AnnotationError("This comment was deleted; it cannot be edited.")
    check_body(body)
    annotation.body = body
    annotation.updated_at = datetime.now(UTC)
    session.commit()
    return annotation


def delete_annotation(session: Session, annotation: Annotation) -> bool:
    """Delete a comment and commit. Returns True when a placeholder stays (it has replies),
    False when the row is gone; placeholders left without replies go too."""
    if _has_replies(session, annotation.id):
        annotation.deleted = True
        annotation.body = ""
        annotation.updated_at = datetime.now(UTC)
        session.commit()
        return True
    parent_id = annotation.parent_id
    session.delete(annotation)
    session.flush()
    while parent_id is not None:
        parent = session.get(Annotation, parent_id)
        if parent is None or not parent.deleted or _has_replies(session, parent.id):
            break
        parent_id = parent.parent_id
        session.delete(parent)
        session.flush()
    session.commit()
    return False


def check_body(body: str) -> None:
    if not body.strip():
        raise AnnotationError("A comment needs some text.")
    if len(body) > ANNOTATION_BODY_MAX_LENGTH:
        raise AnnotationError(
            f"A comment is at most {ANNOTATION_BODY_MAX_LENGTH} characters, not {len(body)}."
        )
    if "\x00" in body:
        # PostgreSQL text cannot hold NUL; refuse it on every backend alike.
        raise AnnotationError("A comment cannot contain NUL characters.")


def check_anchor(anchor: Anchor, params: dict[str, Any]) -> None:
    """Refuse anchors that point nowhere: negative or out-of-range indices, a head without
    its layer, a half-open or reversed token range."""
    if anchor.stack is not None and not _STACK_PATTERN.fullmatch(anchor.stack):
        raise AnnotationError(f"stack is 1 to {STACK_MAX_LENGTH} letters, digits, '_', '.' or '-'.")
    if anchor.head is not None and anchor.layer is None:
        raise AnnotationError("A comment on a head needs its layer too.")
    if (anchor.token_start is None) != (anchor.token_end is None):
        raise AnnotationError("Give both token_start and token_end, or neither.")
    _check_index("layer", anchor.layer, params.get("n_layers"))
    _check_index("head", anchor.head, params.get("n_heads"))
    _check_index("token_start", anchor.token_start, params.get("n_tokens"))
    _check_index("token_end", anchor.token_end, params.get("n_tokens"))
    start, end = anchor.token_start, anchor.token_end
    if start is not None and end is not None and start > end:
        raise AnnotationError("token_start must not come after token_end.")


def _check_index(name: str, value: int | None, count: object) -> None:
    if value is None:
        return
    if value < 0:
        raise AnnotationError(f"{name} must not be negative, not {value}.")
    if isinstance(count, int) and not isinstance(count, bool) and value >= count:
        raise AnnotationError(
            f"{name} {value} does not exist; this visualization has 0 to {count - 1}."
        )


def _reply_anchor(session: Session, artefact: Artefact, parent_id: int, anchor: Anchor) -> Anchor:
    """The anchor a reply takes: its parent's. An explicit, different anchor is refused
    rather than silently dropped."""
    parent = session.get(Annotation, parent_id)
    if parent is None or parent.artefact_id != artefact.id or parent.deleted:
        raise AnnotationError(f"There is no comment {parent_id} to reply to here.")
    parent_anchor = Anchor.of(parent)
    if not anchor.is_empty and anchor != parent_anchor:
        raise AnnotationError("A reply shares its thread's anchor; leave the anchor out.")
    return parent_anchor


def _has_replies(session: Session, annotation_id: int) -> bool:
    return bool(session.scalar(select(exists().where(Annotation.parent_id == annotation_id))))
