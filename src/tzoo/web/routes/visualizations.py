"""Attention visualizations over REST and as pages: create, read layer by layer, share.

Thin: the service computes and stores, the access module decides who sees what, the
views draw. Attention arrives one layer at a time (float16 binary by default), so a
512-token input never ships its whole tensor at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tzoo.service.model_loading import public_statuses
from tzoo.service.quotas import charge_visualization
from tzoo.service.visualizations import (
    KIND,
    VisualizationRequest,
    create_visualization,
    default_stack,
    load_all_parts,
    stack_bias_part,
    stack_layer_part,
    view_arrays,
)
from tzoo.store.artefacts import (
    MAX_LIST_LIMIT,
    delete_artefact,
    list_artefacts,
    load_part,
    stored_bytes,
)
from tzoo.store.models import Artefact
from tzoo.web.access import owned_artefact, visible_artefact
from tzoo.web.deps import (
    ClientKeyDep,
    CsrfCheckDep,
    CurrentUserDep,
    ManagerDep,
    SessionDep,
    SettingsDep,
    page_auth,
    web_model,
)
from tzoo.web.errors import USER_ERRORS, error_body, retry_after_of, status_for
from tzoo.web.routes.pages import render_home

router = APIRouter(prefix="/api/visualizations", tags=["visualizations"])
pages = APIRouter(tags=["pages"], include_in_schema=False)

MAX_TEXT_CHARS = 20_000
Visibility = Literal["public", "unlisted", "private"]
ViewType = Literal["head", "model", "neuron"]


class VisualizationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model_name: str = Field(min_length=1, max_length=1024, examples=["minilm-l6"])
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, examples=["The cat sat on the mat."])
    pair: str | None = Field(
        None,
        max_length=MAX_TEXT_CHARS,
        description="Sentence B (or the decoder text of an encoder-decoder model)",
    )
    view_type: ViewType = "head"
    visibility: Visibility = "public"


class VisualizationCreated(BaseModel):
    slug: str
    url: str


class VisualizationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    visibility: Visibility


class VisualizationSummary(BaseModel):
    slug: str
    url: str
    model_name: str
    text: str
    view_type: str
    owner: str | None
    created_at: str
    n_tokens: int


def _url(request: Request, slug: str) -> str:
    settings = request.app.state.settings
    base = (
        settings.public_url.rstrip("/")
        if settings.public_url
        else str(request.base_url).rstrip("/")
    )
    return f"{base}/viz/{slug}"


def _create(
    request: Request,
    session: Any,
    manager: Any,
    settings: Any,
    user: Any,
    body: VisualizationCreate,
    client: str,
) -> Artefact:
    if body.visibility == "private" and user is None:
        raise HTTPException(
            401, "Log in to keep a private visualization (nobody could open it otherwise)."
        )
    spec = VisualizationRequest(
        model_name=web_model(request, body.model_name),
        text=body.text,
        pair=body.pair or None,
        view_type=body.view_type,
        visibility=body.visibility,
        owner=user.username if user else None,
    )
    with charge_visualization(request.app.state.quotas, settings.visualizations_per_minute, client):
        return create_visualization(
            session, manager, request.app.state.result_cache, settings, spec
        )


@router.post(
    "",
    status_code=201,
    response_model=VisualizationCreated,
    responses={
        429: {
            "description": "More than TZOO_VISUALIZATIONS_PER_MINUTE this minute "
            "(Retry-After says when to try again)"
        }
    },
)
def create(
    body: VisualizationCreate,
    request: Request,
    session: SessionDep,
    manager: ManagerDep,
    settings: SettingsDep,
    user: CurrentUserDep,
    client: ClientKeyDep,
    _csrf: CsrfCheckDep,
) -> VisualizationCreated:
    """Compute a model's attention for a text and keep it at a permanent link (at most
    TZOO_VISUALIZATIONS_PER_MINUTE a minute per client, then 429 with Retry-After)."""
    artefact = _create(request, session, manager, settings, user, body, client)
    return VisualizationCreated(slug=artefact.slug, url=_url(request, artefact.slug))


@router.get("", response_model=list[VisualizationSummary])
def gallery_api(
    request: Request,
    session: SessionDep,
    model: str | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[VisualizationSummary]:
    """Public visualizations, newest first, filtered by model and by text."""
    rows = list_artefacts(
        session, kind=KIND, model_name=model or None, text_contains=q, limit=limit, offset=offset
    )
    return [_summary(request, a) for a in rows]


def _summary(request: Request, artefact: Artefact) -> VisualizationSummary:
    return VisualizationSummary(
        slug=artefact.slug,
        url=_url(request, artefact.slug),
        model_name=artefact.model_name,
        text=artefact.input_text,
        view_type=artefact.params.get("view_type", "head"),
        owner=artefact.owner,
        created_at=artefact.created_at.isoformat(),
        n_tokens=int(artefact.params.get("n_tokens", 0)),
    )


def visualization_meta(request: Request, session: Any, artefact: Artefact) -> dict[str, Any]:
    """The view's metadata contract: the analysis meta plus where and whose it is."""
    return {
        **artefact.params["meta"],
        "slug": artefact.slug,
        "url": _url(request, artefact.slug),
        "view_type": artefact.params.get("view_type", "head"),
        "visibility": artefact.visibility,
        "owner": artefact.owner,
        "created_at": artefact.created_at.isoformat(),
        "stored_bytes": stored_bytes(session, artefact),
    }


@router.get("/{slug}")
def read(slug: str, request: Request, session: SessionDep, user: CurrentUserDep) -> dict[str, Any]:
    """Metadata, tokens and head statistics; attention itself comes layer by layer."""
    return visualization_meta(request, session, visible_artefact(session, slug, user))


def _layer_arrays(
    session: Any, artefact: Artefact, stack: str | None, layer: int, *, neurons: bool
) -> dict[str, np.ndarray]:
    try:
        name = stack_layer_part(artefact, stack or default_stack(artefact), layer, neurons=neurons)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    arrays = load_part(session, artefact, name)
    if arrays is None:
        raise HTTPException(404, f"This visualization has no stored data for {name}.")
    return arrays


def _binary(array: np.ndarray) -> Response:
    data = np.ascontiguousarray(array, dtype="<f2")
    return Response(
        data.tobytes(),
        media_type="application/octet-stream",
        headers={
            "X-Tzoo-Shape": ",".join(str(n) for n in data.shape),
            "X-Tzoo-Dtype": "float16",
            "Cache-Control": "private, max-age=3600",
        },
    )


@router.get(
    "/{slug}/attention",
    responses={200: {"content": {"application/octet-stream": {}, "application/json": {}}}},
)
def read_layer(
    slug: str,
    session: SessionDep,
    user: CurrentUserDep,
    layer: Annotated[int, Query(ge=0, le=10_000)],
    stack: Annotated[str | None, Query(max_length=16)] = None,
    format: Literal["binary", "json"] = "binary",
) -> Any:
    """One layer's attention (heads, Tq, Tk): float16 little-endian bytes with its shape in
    ``X-Tzoo-Shape``, or nested lists ``[heads][Tq][Tk]`` with ``format=json``."""
    artefact = visible_artefact(session, slug, user)
    weights = _layer_arrays(session, artefact, stack, layer, neurons=False)["attention"]
    if format == "json":
        return weights.astype(np.float32).tolist()
    return _binary(weights)


@router.get("/{slug}/neurons", responses={200: {"content": {"application/octet-stream": {}}}})
def read_neurons(
    slug: str,
    session: SessionDep,
    user: CurrentUserDep,
    layer: Annotated[int, Query(ge=0, le=10_000)],
    stack: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    """Query and key vectors of one layer for the neuron view: float16 (2, heads, T, d_head)."""
    artefact = visible_artefact(session, slug, user)
    arrays = _layer_arrays(session, artefact, stack, layer, neurons=True)
    queries, keys = arrays["queries"], arrays["keys"]
    if queries.shape != keys.shape:  # cross attention: Tq != Tk; send them as two blocks
        raise HTTPException(404, "Neuron data is only served for self-attention stacks.")
    return _binary(np.stack([queries, keys]))


@router.get("/{slug}/position_bias", responses={200: {"content": {"application/octet-stream": {}}}})
def read_position_bias(
    slug: str,
    session: SessionDep,
    user: CurrentUserDep,
    stack: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    """The learned relative-position bias T5 adds to ``score_scale * q·k`` before the
    softmax, shared by every layer of the stack: float16 (heads, Tq, Tk)."""
    artefact = visible_artefact(session, slug, user)
    try:
        name = stack_bias_part(artefact, stack or default_stack(artefact))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    arrays = load_part(session, artefact, name)
    if arrays is None:
        raise HTTPException(404, f"This visualization has no stored data for {name}.")
    return _binary(arrays["position_bias"])


@router.patch("/{slug}", response_model=VisualizationSummary)
def update(
    slug: str,
    body: VisualizationUpdate,
    request: Request,
    session: SessionDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> VisualizationSummary:
    """Change who can see it (owner only)."""
    artefact = owned_artefact(session, slug, user)
    artefact.visibility = body.visibility
    session.commit()
    return _summary(request, artefact)


@router.delete("/{slug}", status_code=204)
def delete(slug: str, session: SessionDep, user: CurrentUserDep, _csrf: CsrfCheckDep) -> Response:
    """Delete it for good (owner only)."""
    owned_artefact(session, slug, user)
    delete_artefact(session, slug)
    return Response(status_code=204)


# -- pages ---------------------------------------------------------------------------


@pages.post("/visualize")
def visualize_form(
    request: Request,
    session: SessionDep,
    manager: ManagerDep,
    settings: SettingsDep,
    user: CurrentUserDep,
    client: ClientKeyDep,
    _csrf: CsrfCheckDep,
    model_name: Annotated[str, Form()],
    text: Annotated[str, Form()],
    view_type: Annotated[str, Form()] = "head",
    visibility: Annotated[str, Form()] = "public",
    pair: Annotated[str | None, Form()] = None,
) -> Response:
    """The home form: compute, store, and go to the permanent page. Bad input shows the
    form again with the reason and everything the user typed."""
    form = {"model_name": model_name, "text": text, "pair": pair, "view_type": view_type}
    try:
        body = VisualizationCreate.model_validate(
            {
                "model_name": model_name,
                "text": text,
                "pair": pair or None,
                "view_type": view_type,
                "visibility": visibility,
            }
        )
        artefact = _create(request, session, manager, settings, user, body, client)
    except ValidationError as exc:
        return render_home(
            request, manager, status_code=422, form=form, form_error=_first_error(exc)
        )
    except HTTPException as exc:
        return render_home(
            request, manager, status_code=exc.status_code, form=form, form_error=str(exc.detail)
        )
    except USER_ERRORS as exc:
        page = render_home(
            request,
            manager,
            status_code=status_for(exc),
            form=form,
            form_error=str(error_body(exc)["detail"]),
        )
        wait = retry_after_of(exc)
        if wait is not None:
            page.headers["Retry-After"] = str(wait)
        return page
    return RedirectResponse(f"/viz/{artefact.slug}#view={view_type}", status_code=303)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"])
    return f"{field}: {error['msg']}"


@pages.get("/viz/{slug}", response_class=HTMLResponse)
def viz_page(
    slug: str, request: Request, session: SessionDep, user: CurrentUserDep
) -> HTMLResponse:
    artefact = visible_artefact(session, slug, user)
    meta = visualization_meta(request, session, artefact)
    is_owner = user is not None and artefact.owner == user.username
    return request.app.state.templates.TemplateResponse(
        request, "attention/viz.html", {"viz": meta, "is_owner": is_owner}
    )


@pages.get("/viz/{slug}/export.html")
def export_html(slug: str, request: Request, session: SessionDep, user: CurrentUserDep) -> Response:
    """The whole visualization as one offline HTML file (data and scripts inline)."""
    from tzoo.web.standalone import render_standalone_html

    artefact = visible_artefact(session, slug, user)
    meta = visualization_meta(request, session, artefact)
    attention, neurons, position_bias = view_arrays(load_all_parts(session, artefact))
    html = render_standalone_html(
        meta,
        attention,
        neurons,
        position_bias=position_bias,
        title=f"Attention — {artefact.model_name}",
    )
    return HTMLResponse(
        html, headers={"Content-Disposition": f'attachment; filename="tzoo-attention-{slug}.html"'}
    )


@pages.get("/gallery", response_class=HTMLResponse)
def gallery_page(
    request: Request,
    session: SessionDep,
    manager: ManagerDep,
    model: str | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> HTMLResponse:
    per_page = 30
    rows = list_artefacts(
        session,
        kind=KIND,
        model_name=model or None,
        text_contains=q,
        limit=per_page + 1,
        offset=(page - 1) * per_page,
    )
    context = {
        "items": [_summary(request, a) for a in rows[:per_page]],
        "has_next": len(rows) > per_page,
        "page": page,
        "model": model or "",
        "q": q or "",
        "models": [
            s.name for s in public_statuses(manager.status(), operator=page_auth(request).is_admin)
        ],
    }
    return request.app.state.templates.TemplateResponse(request, "attention/gallery.html", context)
