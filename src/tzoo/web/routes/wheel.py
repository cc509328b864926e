"""The token wheel over REST (exactly the reference system's paths) and as pages.

Thin: ``tzoo.service.wheel`` keeps the sessions and their key/value caches, and
``tzoo.analyses.next_token`` shapes and splits the distribution.

A session belongs to whoever created it. Creating one answers its ``key`` once and also
sets it as a cookie (``tzoo_wheel_<id>``: HttpOnly, SameSite=Strict, sent only to
``/api/sessions/<id>``), so the wheel page needs no script to carry it; a script sends it
back in the ``X-Wheel-Session-Key`` header instead. A signed-in creator is also
recognised by their account. Anyone else gets the same 404 as for an unknown id.
Sessions count against their creator: ``TZOO_WHEEL_SESSIONS_PER_CLIENT`` per account (or
per address when anonymous), 429 with Retry-After beyond.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from tzoo.analyses.next_token import InvalidSamplingError, Sampling, wheel_segments
from tzoo.service.model_loading import public_statuses
from tzoo.service.wheel import (
    ContextTooLongError,
    SessionNotFoundError,
    SessionStore,
    TooManySessionsError,
    WheelSession,
)
from tzoo.store.artefacts import create_artefact
from tzoo.web.access import visible_artefact
from tzoo.web.deps import (
    Auth,
    AuthDep,
    CsrfCheckDep,
    CurrentUserDep,
    ManagerDep,
    SessionDep,
    page_auth,
    web_model,
)

router = APIRouter(prefix="/api/sessions", tags=["token wheel"])
replays = APIRouter(prefix="/api/wheel-replays", tags=["token wheel"])
pages = APIRouter(tags=["pages"], include_in_schema=False)

KIND = "wheel"
MAX_PROMPT_CHARS = 20_000
# Above any vocabulary; bounded so a huge number is a 422, not an overflow deeper down.
MAX_TOP_K = 1_000_000
KEY_HEADER = "X-Wheel-Session-Key"
KEY_COOKIE_PREFIX = "tzoo_wheel_"

# The errors each kind of route can answer (the error schema is added in web/openapi.py).
NOT_YOURS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such session, or the caller holds neither its key nor its account"}
}
CREATE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model"},
    413: {"description": "The model is larger than the memory budget allows"},
    422: {"description": "Not a decoder model, or the model cannot be loaded"},
    429: {"description": "Too many sessions for this client or in all; see Retry-After"},
    503: {"description": "The model is not available here"},
}
GROWING_ERRORS: dict[int | str, dict[str, Any]] = {
    **NOT_YOURS,
    413: {"description": "The context would be longer than allowed"},
    507: {
        "description": "The session's key/value cache does not fit in the memory budget "
        "(TZOO_MEMORY_BUDGET_MB)"
    },
}
Threshold = Annotated[
    float, Query(gt=0, le=1, description="Smallest probability with a segment of its own")
]


class StrictBody(BaseModel):
    """A request body that refuses unknown fields and takes JSON numbers as numbers (no
    ``true`` for 1, no ``"0.5"`` for 0.5)."""

    model_config = ConfigDict(extra="forbid")


class SessionCreate(StrictBody):
    model_name: str = Field(min_length=1, max_length=1024, examples=["smollm2-135m"])


class PromptSet(StrictBody):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, examples=["The capital of France is"])


class SamplingFields(StrictBody):
    threshold: StrictFloat = Field(0.01, gt=0, le=1)
    temperature: StrictFloat | None = Field(None, gt=0, le=100)
    top_k: StrictInt | None = Field(None, ge=1, le=MAX_TOP_K)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)

    def sampling(self) -> Sampling:
        return make_sampling(self.temperature, self.top_k, self.top_p)


class AppendToken(SamplingFields):
    token_id: StrictInt | None = Field(None, ge=0)
    choice: Literal["token", "other"] = "token"
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)


class SaveSession(StrictBody):
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


def key_cookie(session_id: str) -> str:
    return KEY_COOKIE_PREFIX + session_id


def _owned_session(
    session_id: str,
    request: Request,
    auth: AuthDep,
    key: Annotated[
        str | None,
        Header(
            alias=KEY_HEADER,
            max_length=256,
            description="The key answered when the session was created (browsers send it "
            "as a cookie instead).",
        ),
    ] = None,
) -> WheelSession:
    """The session, if the caller holds its key (header or cookie) or created it signed
    in; otherwise the 404 of an unknown session."""
    key = key or request.cookies.get(key_cookie(session_id))
    return _store(request).get_owned(session_id, key=key, account=auth.client_key)


OwnedSession = Annotated[WheelSession, Depends(_owned_session)]


def client_of(request: Request, auth: Auth) -> str:
    """Who a new session counts against: the account (or operator), else the address."""
    host = request.client.host if request.client else "unknown"
    return auth.client_key or f"ip:{host}"


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


@router.post("", status_code=201, responses=CREATE_ERRORS)
def create_session(
    body: SessionCreate, request: Request, response: Response, auth: AuthDep, _csrf: CsrfCheckDep
) -> dict[str, Any]:
    """Start a session on a decoder model; it expires after an hour idle. The answer
    carries the session's ``key`` (also set as a cookie for this session's paths): every
    later request on the session must send it, in the X-Wheel-Session-Key header."""
    with _bad_input_is_422():
        session = _store(request).create(
            web_model(request, body.model_name),
            client=client_of(request, auth),
            owner=auth.client_key,
        )
    response.set_cookie(
        key_cookie(session.id),
        session.key,
        path=request.url_for("read_session", session_id=session.id).path,
        httponly=True,
        samesite="strict",
        secure=request.app.state.settings.cookies_secure,
    )
    return {**session.snapshot(), "key": session.key}


@router.get("/{session_id}", responses=NOT_YOURS)
def read_session(session: OwnedSession) -> dict[str, Any]:
    return session.snapshot()


@router.post("/{session_id}/set-prompt", responses=GROWING_ERRORS)
def set_prompt(session: OwnedSession, body: PromptSet, _csrf: CsrfCheckDep) -> dict[str, Any]:
    """Tokenise the prompt once; later tokens are appended by id and never re-tokenised."""
    with _bad_input_is_422():
        session.set_prompt(body.prompt)
    return session.snapshot()


@router.get("/{session_id}/next-token-probs", responses=NOT_YOURS)
def next_token_probs(
    session: OwnedSession,
    threshold: Threshold = 0.01,
    temperature: Annotated[float | None, Query(gt=0, le=100)] = None,
    top_k: Annotated[int | None, Query(ge=1, le=MAX_TOP_K)] = None,
    top_p: Annotated[float | None, Query(gt=0, le=1)] = None,
) -> dict[str, Any]:
    """Every token at or above ``threshold`` plus one "other" wedge, under the sampling
    controls; ``applied`` says which controls changed the distribution."""
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


@router.post("/{session_id}/append-token", responses=GROWING_ERRORS)
def append_token(session: OwnedSession, body: AppendToken, _csrf: CsrfCheckDep) -> dict[str, Any]:
    """Append a token by id, or let the server sample from the "other" wedge."""
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


@router.post("/{session_id}/undo", responses=GROWING_ERRORS)
def undo(session: OwnedSession, _csrf: CsrfCheckDep) -> dict[str, Any]:
    """Take back the last token; at the prompt, ``undone`` is null."""
    step = session.undo()
    return {"undone": step_dict(step) if step else None, "session": session.snapshot()}


@router.delete("/{session_id}", status_code=204, responses=NOT_YOURS)
def delete_session(session: OwnedSession, request: Request, _csrf: CsrfCheckDep) -> Response:
    """End the session: its memory is given back at once, and its cookie cleared."""
    _store(request).delete(session.id)
    response = Response(status_code=204)
    response.delete_cookie(
        key_cookie(session.id),
        path=request.url_for("read_session", session_id=session.id).path,
        httponly=True,
        samesite="strict",
        secure=request.app.state.settings.cookies_secure,
    )
    return response


@router.post(
    "/{session_id}/save",
    status_code=201,
    responses={**NOT_YOURS, 401: {"description": "Log in to keep a private replay"}},
)
def save(
    session: OwnedSession,
    body: SaveSession,
    request: Request,
    db: SessionDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> dict[str, str]:
    """Keep the session's path at a permanent link that replays it step by step."""
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
        for s in public_statuses(manager.status(), operator=page_auth(request).is_admin)
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
