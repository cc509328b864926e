"""Comments on visualizations, anchored to a stack, layer, head and token range.

Anyone who can see a visualization can read its comments; logged-in users write them,
and edit or delete their own. Bodies come back exactly as typed: the page renders them
as text (never as HTML). Browser scripts send ``X-CSRF-Token`` (from the page's
``<meta name="csrf-token">``) with POST, PATCH and DELETE; API-token callers do not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from tzoo.store.annotations import (
    Anchor,
    AnnotationError,
    Threaded,
    create_annotation,
    delete_annotation,
    edit_annotation,
    get_annotation,
    list_annotations,
)
from tzoo.store.models import ANNOTATION_BODY_MAX_LENGTH, STACK_MAX_LENGTH, Annotation, User
from tzoo.web.access import can_view, visible_artefact
from tzoo.web.deps import CsrfCheckDep, CurrentUserDep, RequiredUserDep, SessionDep

router = APIRouter(prefix="/api", tags=["annotations"])

NO_SUCH_COMMENT = "No comment with this id."
NOT_THE_AUTHOR = "Only its author can edit or delete a comment."
Body = Annotated[str, Field(min_length=1, max_length=ANNOTATION_BODY_MAX_LENGTH)]
# Bounded: the store's integer columns (and SQLite's driver) take at most 32 bits.
MAX_INDEX = 2**31 - 1
Index = Annotated[int | None, Field(ge=0, le=MAX_INDEX)]
CommentId = Annotated[int, Path(ge=1, le=MAX_INDEX)]


class AnnotationCreate(BaseModel):
    """A new comment. A reply (``parent_id``) takes its thread's anchor: leave the anchor
    fields out. ``head`` needs ``layer``; the token range is both ends or neither,
    inclusive, in the visualization's token positions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    body: Body
    parent_id: Annotated[int | None, Field(ge=1, le=MAX_INDEX)] = None
    stack: str | None = Field(None, min_length=1, max_length=STACK_MAX_LENGTH)
    layer: Index = None
    head: Index = None
    token_start: Index = None
    token_end: Index = None

    def anchor(self) -> Anchor:
        return Anchor(self.stack, self.layer, self.head, self.token_start, self.token_end)


class AnnotationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    body: Body


class AnnotationPublic(BaseModel):
    """One comment. ``depth`` is its nesting (0 starts a thread); deleted comments kept
    for their replies have ``deleted`` true, an empty body and no author."""

    id: int
    parent_id: int | None
    depth: int
    author: str | None
    body: str
    stack: str | None
    layer: int | None
    head: int | None
    token_start: int | None
    token_end: int | None
    created_at: datetime
    updated_at: datetime
    deleted: bool
    can_edit: bool

    @classmethod
    def of(cls, annotation: Annotation, user: User | None, depth: int = 0) -> AnnotationPublic:
        mine = user is not None and annotation.author_id == user.id
        return cls(
            id=annotation.id,
            parent_id=annotation.parent_id,
            depth=depth,
            author=None if annotation.deleted else annotation.author.username,
            body="" if annotation.deleted else annotation.body,
            stack=annotation.stack,
            layer=annotation.layer,
            head=annotation.head,
            token_start=annotation.token_start,
            token_end=annotation.token_end,
            created_at=annotation.created_at,
            updated_at=annotation.updated_at,
            deleted=annotation.deleted,
            can_edit=mine and not annotation.deleted,
        )


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not logged in and no valid API token"},
    403: {"description": "Not the author, or the CSRF check failed"},
    404: {"description": "No such visualization or comment (or not visible to you)"},
    422: {"description": "Empty or overlong body, or an anchor outside the visualization"},
}


@router.get("/visualizations/{slug}/annotations", responses={404: _ERRORS[404]})
def list_for_visualization(
    slug: str,
    session: SessionDep,
    user: CurrentUserDep,
    stack: Annotated[str | None, Query(max_length=STACK_MAX_LENGTH)] = None,
    layer: Annotated[int | None, Query(ge=0, le=MAX_INDEX)] = None,
    head: Annotated[int | None, Query(ge=0, le=MAX_INDEX)] = None,
) -> list[AnnotationPublic]:
    """The visualization's comments in reading order (each thread root, then its replies
    depth first), optionally only those anchored to a stack, layer or head."""
    artefact = visible_artefact(session, slug, user)
    threaded = list_annotations(session, artefact, stack=stack, layer=layer, head=head)
    return [_public(item, user) for item in threaded]


@router.post("/visualizations/{slug}/annotations", status_code=201, responses=_ERRORS)
def create(
    slug: str,
    body: AnnotationCreate,
    session: SessionDep,
    user: RequiredUserDep,
    _csrf: CsrfCheckDep,
) -> AnnotationPublic:
    """Comment on a visualization you can see, or reply to a comment on it."""
    artefact = visible_artefact(session, slug, user)
    try:
        annotation = create_annotation(
            session, artefact, user, body.body, anchor=body.anchor(), parent_id=body.parent_id
        )
    except AnnotationError as error:
        raise HTTPException(422, str(error)) from None
    return AnnotationPublic.of(annotation, user)


@router.patch("/annotations/{annotation_id}", responses=_ERRORS)
def update(
    annotation_id: CommentId,
    body: AnnotationUpdate,
    session: SessionDep,
    user: RequiredUserDep,
    _csrf: CsrfCheckDep,
) -> AnnotationPublic:
    """Edit your own comment's text."""
    annotation = _own_annotation(session, annotation_id, user)
    try:
        edit_annotation(session, annotation, body.body)
    except AnnotationError as error:
        raise HTTPException(422, str(error)) from None
    return AnnotationPublic.of(annotation, user)


@router.delete("/annotations/{annotation_id}", status_code=204, responses=_ERRORS)
def delete(
    annotation_id: CommentId, session: SessionDep, user: RequiredUserDep, _csrf: CsrfCheckDep
) -> Response:
    """Delete your own comment; one with replies stays as a "deleted" placeholder."""
    delete_annotation(session, _own_annotation(session, annotation_id, user))
    return Response(status_code=204)


def _own_annotation(session: Session, annotation_id: int, user: User) -> Annotation:
    """404 for a comment that does not exist, was deleted, or sits on a visualization the
    user cannot see; 403 for someone else's."""
    annotation = get_annotation(session, annotation_id)
    if annotation is None or annotation.deleted or not can_view(annotation.artefact, user):
        raise HTTPException(404, NO_SUCH_COMMENT)
    if annotation.author_id != user.id:
        raise HTTPException(403, NOT_THE_AUTHOR)
    return annotation


def _public(item: Threaded, user: User | None) -> AnnotationPublic:
    return AnnotationPublic.of(item.annotation, user, item.depth)
