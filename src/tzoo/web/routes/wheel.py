"""The token wheel over REST (exactly the reference system's paths) and as pages.

Thin: ``tzoo.service.wheel`` keeps the sessions and their key/value caches, and
``tzoo.analyses.next_token`` shapes and splits the distribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from tzoo.analyses.next_token import InvalidSamplingError, Sampling, wheel_segments
from tzoo.service.wheel import (
    ContextTooLongError,
    SessionNotFoundError,
    SessionStore,
    TooManySessionsError,
    WheelSession,
)
from tzoo.store.artefacts import create_artefact
from tzoo.web.access import visible_artefact
from tzoo.web.deps import CsrfCheckDep, CurrentUserDep, ManagerDep, SessionDep

router = APIRouter(prefix="/api/sessions", tags=["token wheel"])
replays = APIRouter(prefix="/api/wheel-replays", tags=["token wheel"])
pages = APIRouter(tags=["pages"], include_in_schema=False)

KIND = "wheel"
MAX_PROMPT_CHARS = 20_000
Threshold = Annotated[
    float, Query(gt=0, le=1, description="Smallest probability with a segment of its own")
]


class SessionCreate(BaseModel):
    model_name: str = Field(min_length=1, max_length=1024, examples=["smollm2-135m"])


class PromptSet(BaseModel):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, examples=["The capital of France is"])


class SamplingFields(BaseModel):
    threshold: float = Field(0.01, gt=0, le=1)
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)

    def sampling(self) -> Sampling:
        return make_sampling(self.temperature, self.top_k, self.top_p)


class AppendToken(SamplingFields):
    token_id: int | None = Field(None, ge=0)
    choice: Literal["token", "other"] = "token"
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class SaveSession(BaseModel):
    visibility: Literal["public", "unlisted", "private"] = "public"


def make_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> Sampling:
    try:
        return Sampling(
            temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p
        )
    except InvalidSamplingError as exc:
        raise HTTPException(422, str(exc)) from None


def _store(request: Request) -> SessionStore:
    return request.app.state.wheel_sessions


def _session(request: Request, session_id: str) -> WheelSession:
    return _store(request).get(session_id)


@contextmanager
def _bad_input_is_422() -> Iterator[None]:
    """The service's own errors go to the app's handlers (404, 413, 429); any other
    ValueError is the caller's input (a bad prompt, token id or sampling control)."""
    try:
        yield
    except (ContextTooLongError, SessionNotFoundError, TooManySessionsError):
        raise
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.post("", status_code=201)
def create_session(body: SessionCreate, request: Request, _csrf: CsrfCheckDep) -> dict[str, Any]:
    """Start a session on a decoder model; it expires after an hour idle."""
    with _bad_input_is_422():
        return _store(request).create(body.model_name).snapshot()


@router.get("/{session_id}")
def read_session(session_id: str, request: Request) -> dict[str, Any]:
    return _session(request, session_id).snapshot()


@router.post("/{session_id}/set-prompt")
def set_prompt(
    session_id: str, body: PromptSet, request: Request, _csrf: CsrfCheckDep
) -> dict[str, Any]:
    """Tokenise the prompt once; later tokens are appended by id and never re-tokenised."""
    session = _session(request, session_id)
    with _bad_input_is_422():
        session.set_prompt(body.prompt)
    return session.snapshot()


@router.get("/{session_id}/next-token-probs")
def next_token_probs(
    session_id: str,
    request: Request,
    threshold: Threshold = 0.01,
    temperature: Annotated[float | None, Query(gt=0, le=100)] = None,
    top_k: Annotated[int | None, Query(ge=1)] = None,
    top_p: Annotated[float | None, Query(gt=0, le=1)] = None,
) -> dict[str, Any]:
    """Every token at or above ``threshold`` plus one "other" wedge, under the sampling
    controls; ``applied`` says which controls changed the distribution."""
    session = _session(request, session_id)
    sampling = make_sampling(temperature, top_k, top_p)
    with _bad_input_is_422():
        probs = session.distribution(sampling)
        wheel = wheel_segments(probs, threshold, session.tokenizer)
    return {
        **wheel,
        "applied": sampling.applied(),
        "threshold": threshold,
        "context_tokens": len(session.context_ids()),
    }


@router.post("/{session_id}/append-token")
def append_token(
    session_id: str, body: AppendToken, request: Request, _csrf: CsrfCheckDep
) -> dict[str, Any]:
    """Append a token by id, or let the server sample from the "other" wedge."""
    session = _session(request, session_id)
    sampling = body.sampling()
    if body.choice == "token" and body.token_id is None:
        raise HTTPException(422, 'Send a token_id, or choice: "other".')
    with _bad_input_is_422():
        if body.choice == "other":
            step = session.append_other(sampling=sampling, threshold=body.threshold, seed=body.seed)
        else:
            assert body.token_id is not None
            step = session.append(body.token_id, sampling=sampling, threshold=body.threshold)
    return {"step": step_dict(step), "session": session.snapshot()}


@router.post("/{session_id}/undo")
def undo(session_id: str, request: Request, _csrf: CsrfCheckDep) -> dict[str, Any]:
    """Take back the last token; at the prompt, ``undone`` is null."""
    session = _session(request, session_id)
    step = session.undo()
    return {"undone": step_dict(step) if step else None, "session": session.snapshot()}


@router.delete("/{session_id}", status_code=204)
def delete_session(session_id: str, request: Request, _csrf: CsrfCheckDep) -> Response:
    if not _store(request).delete(session_id):
        _session(request, session_id)  # raises the usual 404 with its sentence
    return Response(status_code=204)


@router.post("/{session_id}/save", status_code=201)
def save(
    session_id: str,
    body: SaveSession,
    request: Request,
    db: SessionDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> dict[str, str]:
    """Keep the session's path at a permanent link that replays it step by step."""
    session = _session(request, session_id)
    if body.visibility == "private" and user is None:
        raise HTTPException(
            401, "Log in to keep a private replay (nobody could open it otherwise)."
        )
    snapshot = session.snapshot()
    if not snapshot["steps"]:
        raise HTTPException(422, "Append at least one token before saving the path.")
    import numpy as np

    replay = {k: snapshot[k] for k in ("model_name", "prompt", "prompt_tokens", "steps", "text")}
    artefact = create_artefact(
        db,
        kind=KIND,
        model_name=session.model_name,
        input_text=session.prompt,
        params={"replay": replay, "n_steps": len(snapshot["steps"])},
        arrays={"context_ids": np.asarray(session.context_ids(), dtype=np.int64)},
        owner=user.username if user else None,
        visibility=body.visibility,
    )
    return {"slug": artefact.slug, "url": _replay_url(request, artefact.slug)}


def _replay_url(request: Request, slug: str) -> str:
    settings = request.app.state.settings
    base = (
        settings.public_url.rstrip("/")
        if settings.public_url
        else str(request.base_url).rstrip("/")
    )
    return f"{base}/wheel/replay/{slug}"


def _replay(db: Any, slug: str, user: Any) -> dict[str, Any]:
    artefact = visible_artefact(db, slug, user)
    if artefact.kind != KIND:
        raise HTTPException(404, "No token-wheel replay at this link.")
    return {
        **artefact.params["replay"],
        "slug": slug,
        "created_at": artefact.created_at.isoformat(),
    }


@replays.get("/{slug}")
def read_replay(slug: str, db: SessionDep, user: CurrentUserDep) -> dict[str, Any]:
    """A saved path: the prompt and every step with the wheel that was shown."""
    return _replay(db, slug, user)


def step_dict(step: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(step)


# -- pages ---------------------------------------------------------------------------


@pages.get("/wheel", response_class=HTMLResponse)
def wheel_page(request: Request, manager: ManagerDep) -> HTMLResponse:
    models = [
        {"name": s.name, "architecture": s.architecture}
        for s in manager.status()
        if s.available and s.architecture == "decoder"
    ]
    names = [m["name"] for m in models]
    default = "smollm2-135m" if "smollm2-135m" in names else (names[0] if names else "")
    context = {"models": models, "default_model": default}
    return request.app.state.templates.TemplateResponse(request, "wheel/wheel.html", context)


@pages.get("/wheel/replay/{slug}", response_class=HTMLResponse)
def replay_page(slug: str, request: Request, db: SessionDep, user: CurrentUserDep) -> HTMLResponse:
    context = {"replay": _replay(db, slug, user)}
    return request.app.state.templates.TemplateResponse(request, "wheel/replay.html", context)
