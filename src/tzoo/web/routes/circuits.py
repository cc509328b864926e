"""Attribution graphs over REST and as pages: transcoder sets, graphs, views, feature
dashboards, interventions and explanations (the circuit agent, as background jobs).

Thin: the service computes and stores, the access module decides who sees what, the
page (static/js/circuits/) draws. Routes that run the model are plain ``def`` routes, so
FastAPI runs them in its thread pool and the event loop stays free; the service holds the
model exclusively (``ModelManager.use(..., exclusive=True)``) while hooks are installed.
Explanations take longer (labelling runs a language model), so they run as jobs on the
service's worker threads and the page polls them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from sqlalchemy.orm import Session

from tzoo.circuits.labels import ExplainerError
from tzoo.runtime.catalogue import catalogue
from tzoo.service.circuit_answers import (
    DEFAULT_PATHS,
    MAX_LISTED_ANSWERS,
    MAX_PATHS,
    MAX_TARGET_CHARS,
    ExplanationJobs,
    NoSuchExplanationError,
    answer_summary,
    delete_graph_answers,
    graph_answers,
    stored_answer,
)
from tzoo.service.circuits import (
    DEFAULT_EDGE_THRESHOLD,
    DEFAULT_MAX_FEATURE_NODES,
    DEFAULT_NODE_THRESHOLD,
    GRAPH_KIND,
    MAX_FEATURE_NODES,
    MAX_INTERVENTIONS,
    MAX_PINNED,
    MAX_SUPERNODES,
    TRAIN_COMMAND,
    GraphRequest,
    GraphView,
    InterventionSpec,
    StoredGraph,
    Supernode,
    canonical_model_name,
    create_graph,
    create_view,
    delete_graph,
    feature_dashboard,
    graph_document,
    graph_info,
    list_transcoder_sets,
    run_interventions,
    view_of,
)
from tzoo.service.quotas import charge_visualization
from tzoo.store.artefacts import MAX_LIST_LIMIT, list_artefacts
from tzoo.store.models import Artefact, User
from tzoo.web.access import can_view, is_owner, owned_artefact, visible_artefact
from tzoo.web.deps import (
    ClientKeyDep,
    CsrfCheckDep,
    CurrentUserDep,
    ManagerDep,
    SessionDep,
    SettingsDep,
    web_model,
)
from tzoo.web.errors import error_body, status_for

router = APIRouter(prefix="/api", tags=["circuits"])
pages = APIRouter(tags=["pages"], include_in_schema=False)

MAX_PROMPT_CHARS = 4000
NO_GRAPH = "No attribution graph at this link."
NO_VIEW = "No saved view with this id for this graph."
NO_EXPLANATION = "No explanation with this id for this graph."
Visibility = Literal["public", "unlisted", "private"]
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]
NodeId = Annotated[str, Field(min_length=1, max_length=64)]
# Bounds for layer and feature numbers (beyond any model; they keep numbers sent in
# requests within what indexing and the database take).
MAX_LAYER = 10_000
MAX_FEATURE = 2**31 - 1

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model, transcoder set, graph, view or feature"},
    409: {"description": "No transcoders trained for the model yet (the body gives the command)"},
    413: {"description": "The prompt is longer than graphs accept"},
    422: {"description": "Bad target position, an encoder model, or nodes not in the graph"},
}


# -- schemas --------------------------------------------------------------------------------------


class TranscoderSetPublic(BaseModel):
    id: str
    model_name: str
    kind: str
    activation: str
    layers: list[int]
    n_features: int | None
    tokens: int | None
    explained_variance: float | None
    next_token_agreement: float | None


class ModelTranscoders(BaseModel):
    model_name: str
    sets: list[TranscoderSetPublic]


class TranscodersPublic(BaseModel):
    models: list[ModelTranscoders]
    train_command: str = Field(description="The command that trains a set for a model")


class GraphCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model_name: str = Field(min_length=1, max_length=1024, examples=["smollm2-135m"])
    transcoders: str | None = Field(
        None,
        max_length=1024,
        description="A transcoder set id from GET /api/transcoders; empty: the model's first",
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["The capital of"])
    target_position: int | None = Field(
        None,
        ge=-MAX_PROMPT_CHARS,
        le=MAX_PROMPT_CHARS,
        description="Where the logits are read (negative: from the end); default the last "
        "token, or an encoder's first mask token",
    )
    node_threshold: Threshold = DEFAULT_NODE_THRESHOLD
    edge_threshold: Threshold = DEFAULT_EDGE_THRESHOLD
    max_feature_nodes: int = Field(DEFAULT_MAX_FEATURE_NODES, ge=0, le=MAX_FEATURE_NODES)
    visibility: Visibility = "public"


class GraphCreated(BaseModel):
    slug: str
    url: str


class GraphUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    visibility: Visibility


class GraphSummary(BaseModel):
    slug: str
    url: str
    model_name: str
    prompt: str
    transcoders: str
    n_nodes: int
    n_edges: int
    owner: str | None
    visibility: str
    created_at: str


class SupernodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100)
    nodes: list[NodeId] = Field(min_length=1, max_length=MAX_PINNED)


class ViewCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    pinned: list[NodeId] = Field(default_factory=list, max_length=MAX_PINNED)
    supernodes: list[SupernodeIn] = Field(default_factory=list, max_length=MAX_SUPERNODES)
    node_threshold: Threshold
    edge_threshold: Threshold
    selected: NodeId | None = None

    def view(self) -> GraphView:
        return GraphView(
            pinned=list(self.pinned),
            supernodes=[Supernode(s.name.strip(), list(s.nodes)) for s in self.supernodes],
            node_threshold=self.node_threshold,
            edge_threshold=self.edge_threshold,
            selected=self.selected,
        )


class ViewCreated(BaseModel):
    view_id: str
    url: str


class InterventionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    layer: int = Field(ge=0, le=MAX_LAYER)
    position: int = Field(
        ge=-MAX_PROMPT_CHARS,
        le=MAX_PROMPT_CHARS,
        description="Token position; negative counts from the end",
    )
    feature: int = Field(ge=0, le=MAX_FEATURE)
    scale: float | None = Field(None, allow_inf_nan=False, description="Multiply the activation")
    value: float | None = Field(None, allow_inf_nan=False, description="Set the activation")


class InterventionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    interventions: list[InterventionIn] = Field(min_length=1, max_length=MAX_INTERVENTIONS)
    mode: Literal["direct", "frozen", "live"] = "frozen"
    top_k: int = Field(10, ge=1, le=50)


class ExplanationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    target: (
        # Strict: JSON true is no token id, 5.0 no token text.
        Annotated[StrictInt, Field(ge=0, le=MAX_FEATURE)]
        | Annotated[StrictStr, Field(min_length=1, max_length=MAX_TARGET_CHARS)]
    ) = Field(
        description="A token id (e.g. one of the graph's logit tokens) or the text of exactly "
        "one token; a leading space matters: ' Paris' and 'Paris' are different tokens",
        examples=[" Paris", 6342],
    )
    n_paths: int = Field(DEFAULT_PATHS, ge=1, le=MAX_PATHS, description="Paths to find")
    label: bool = Field(True, description="Label the features on the paths (slower)")


class ExplanationRequestPublic(BaseModel):
    target: int | str
    target_token: int
    n_paths: int
    label: bool


class ExplanationError(BaseModel):
    detail: str
    error: str
    status: int = Field(description="The HTTP status the error would have had")


class ExplanationPublic(BaseModel):
    id: str = Field(description="The id asked for: a job's id or a stored explanation's")
    job_id: str | None
    state: Literal["queued", "running", "done", "failed"]
    stage: str | None = Field(
        description="loading, graph, dashboards, labels or saving while running"
    )
    done: int
    total: int
    position: int | None = Field(
        description="Place in the model's queue: 1 next, 0 running, null when finished"
    )
    elapsed_s: float | None
    request: ExplanationRequestPublic
    explainer: str | None = Field(description="The model that wrote the labels")
    explanation_id: str | None = Field(description="The stored answer's id, once done")
    url: str | None = Field(description="The graph page showing the answer, once done")
    answer: dict[str, Any] | None = Field(
        description="CircuitAnswer: target, probability, paths of steps, labels, once done"
    )
    error: ExplanationError | None


class ExplanationSummary(BaseModel):
    id: str
    url: str
    target: int | str
    target_token: int
    target_text: str
    target_probability: float | None
    n_paths: int = Field(description="Paths found (at most the number asked for)")
    label: bool
    owner: str | None = Field(description="Who asked for it (null: anonymous)")
    created_at: str


# -- helpers --------------------------------------------------------------------------------------


def _base(request: Request) -> str:
    settings = request.app.state.settings
    if settings.public_url:
        return str(settings.public_url).rstrip("/")
    return str(request.base_url).rstrip("/")


def graph_url(request: Request, slug: str, view: str | None = None) -> str:
    return f"{_base(request)}/graph/{slug}" + (f"?view={view}" if view else "")


def explanation_url(request: Request, slug: str, explanation_id: str) -> str:
    return f"{_base(request)}/graph/{slug}?explanation={explanation_id}"


def _visible_graph(session: Session, slug: str, user: User | None) -> Artefact:
    try:
        artefact = visible_artefact(session, slug, user)
    except HTTPException as error:
        raise HTTPException(404, NO_GRAPH) from error
    if artefact.kind != GRAPH_KIND:
        raise HTTPException(404, NO_GRAPH)
    return artefact


def _stored(artefact: Artefact) -> StoredGraph:
    try:
        return StoredGraph.of(artefact)
    except LookupError as error:
        raise HTTPException(404, str(error)) from None


def _view(session: Session, graph: Artefact, view_id: str | None, user: User | None) -> GraphView:
    """The saved view ``view_id`` of ``graph`` (None: the graph's own thresholds)."""
    if view_id is None:
        return GraphView([], [], graph.params["node_threshold"], graph.params["edge_threshold"])
    try:
        return view_of(visible_artefact(session, view_id, user), graph.slug)
    except (HTTPException, LookupError):
        raise HTTPException(404, NO_VIEW) from None


def _summary(request: Request, artefact: Artefact) -> GraphSummary:
    params = artefact.params
    return GraphSummary(
        slug=artefact.slug,
        url=graph_url(request, artefact.slug),
        model_name=artefact.model_name,
        prompt=artefact.input_text,
        transcoders=params["transcoders"]["id"],
        n_nodes=params["n_nodes"],
        n_edges=params["n_edges"],
        owner=artefact.owner,
        visibility=artefact.visibility,
        created_at=artefact.created_at.isoformat(),
    )


def _saved_explanation(
    session: Session, graph: Artefact, explanation_id: str, user: User | None
) -> dict[str, Any]:
    """The stored explanation ``explanation_id`` of ``graph`` as a finished job's status."""
    try:
        return stored_answer(visible_artefact(session, explanation_id, user), graph.slug)
    except (HTTPException, NoSuchExplanationError):
        raise HTTPException(404, NO_EXPLANATION) from None


def explanation_jobs(request: Request) -> ExplanationJobs:
    """The app's explanation jobs (made in ``create_app``, shut down with the app)."""
    jobs: ExplanationJobs = request.app.state.explanation_jobs
    return jobs


def describe_job_error(exc: BaseException) -> dict[str, Any]:
    """``{detail, error, status}`` of a failed job: what the same error would answer as a
    request; anything unexpected is logged and reported without details."""
    if isinstance(exc, ExplainerError):  # an endpoint's or the local labeller's failure
        return {"detail": f"Labelling failed: {exc}", "error": type(exc).__name__, "status": 502}
    status = status_for(exc) if isinstance(exc, Exception) else 500
    if status == 500 or not isinstance(exc, Exception):
        logger.opt(exception=exc).error("An explanation job failed")
        return {
            "detail": "Internal error; the server log has the details.",
            "error": "InternalError",
            "status": 500,
        }
    body = error_body(exc)
    return {"detail": str(body["detail"]), "error": str(body["error"]), "status": status}


def _explanation(request: Request, slug: str, status: dict[str, Any]) -> ExplanationPublic:
    saved = status["explanation_id"]
    url = explanation_url(request, slug, saved) if saved else None
    return ExplanationPublic.model_validate({**status, "url": url})


ExplanationJobsDep = Annotated[ExplanationJobs, Depends(explanation_jobs)]
ViewQuery = Annotated[str | None, Query(max_length=64, description="A saved view's id")]
ExplanationQuery = Annotated[
    str | None, Query(max_length=64, description="A stored explanation's id")
]
ThresholdQuery = Annotated[float | None, Query(ge=0.0, le=1.0)]


# -- transcoders ----------------------------------------------------------------------------------


@router.get("/transcoders", response_model=TranscodersPublic, responses={404: _ERRORS[404]})
def transcoders(
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=1024)] = None,
) -> TranscodersPublic:
    """Saved transcoder sets, by model (``model``: that model's only; unknown -> 404)."""
    sets = list_transcoder_sets(settings)
    if model is not None:
        name = canonical_model_name(settings, model)
        sets = {name: sets.get(name, [])}
    return TranscodersPublic(
        models=[
            ModelTranscoders(
                model_name=name,
                sets=[TranscoderSetPublic(**info.to_dict()) for info in found],
            )
            for name, found in sorted(sets.items())
        ],
        train_command=TRAIN_COMMAND.format(model=model or "smollm2-135m"),
    )


# -- graphs ---------------------------------------------------------------------------------------


@router.post(
    "/graphs",
    status_code=201,
    response_model=GraphCreated,
    responses={
        **_ERRORS,
        429: {
            "description": "More than TZOO_VISUALIZATIONS_PER_MINUTE this minute "
            "(Retry-After says when to try again)"
        },
    },
)
def create(
    body: GraphCreate,
    request: Request,
    session: SessionDep,
    manager: ManagerDep,
    settings: SettingsDep,
    user: CurrentUserDep,
    client: ClientKeyDep,
    _csrf: CsrfCheckDep,
) -> GraphCreated:
    """Compute the attribution graph of a prompt with a saved transcoder set, prune it and
    keep it at a permanent link. Graphs count with attention visualizations against
    TZOO_VISUALIZATIONS_PER_MINUTE per client (then 429 with Retry-After)."""
    if body.visibility == "private" and user is None:
        raise HTTPException(401, "Log in to keep a private graph (nobody could open it otherwise).")
    spec = GraphRequest(
        model_name=web_model(request, body.model_name),
        transcoders=body.transcoders or None,
        prompt=body.prompt,
        target_position=body.target_position,
        node_threshold=body.node_threshold,
        edge_threshold=body.edge_threshold,
        max_feature_nodes=body.max_feature_nodes,
    )
    with charge_visualization(request.app.state.quotas, settings.visualizations_per_minute, client):
        artefact = create_graph(
            session,
            manager,
            settings,
            spec,
            owner=user.username if user else None,
            visibility=body.visibility,
        )
    return GraphCreated(slug=artefact.slug, url=graph_url(request, artefact.slug))


@router.get("/graphs", response_model=list[GraphSummary])
def list_graphs(
    request: Request,
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=1024)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[GraphSummary]:
    """Public graphs, newest first, filtered by model and by prompt."""
    rows = list_artefacts(
        session,
        kind=GRAPH_KIND,
        model_name=model or None,
        text_contains=q,
        limit=limit,
        offset=offset,
    )
    return [_summary(request, a) for a in rows]


@router.get("/graphs/{slug}", responses={404: _ERRORS[404]})
def read(
    slug: str,
    request: Request,
    session: SessionDep,
    user: CurrentUserDep,
    view: ViewQuery = None,
) -> dict[str, Any]:
    """The graph as circuit-tracer's graph JSON with every stored node and link, plus
    what the page needs: a ``tzoo`` object per node (kind, layer, position, share), a
    ``share`` per link (re-thresholding happens in the page), and a top-level ``tzoo``
    object (tokens, logits, scores, transcoder set, owner). ``view``: a saved view's
    pins, supernodes, selection and thresholds as ``qParams``."""
    artefact = _visible_graph(session, slug, user)
    graph = _stored(artefact)
    chosen = _view(session, artefact, view, user)
    document = graph_document(graph, view=chosen, extras=True)
    document["tzoo"] = {
        **graph_info(graph),
        "url": graph_url(request, slug),
        "export_url": f"/api/graphs/{slug}/export",
        "view": {"id": view, **chosen.to_dict()} if view else None,
        "owner": artefact.owner,
        "visibility": artefact.visibility,
        "is_owner": is_owner(artefact, user),
        "created_at": artefact.created_at.isoformat(),
    }
    return document


@router.get(
    "/graphs/{slug}/export",
    responses={200: {"content": {"application/json": {}}}, 404: _ERRORS[404]},
)
def export(
    slug: str,
    session: SessionDep,
    user: CurrentUserDep,
    view: ViewQuery = None,
    node_threshold: ThresholdQuery = None,
    edge_threshold: ThresholdQuery = None,
) -> JSONResponse:
    """The graph as a circuit-tracer graph JSON file (what its front end and Neuronpedia
    open), pruned at the view's thresholds (or the ones given, or the stored ones), with
    the view's pins and supernodes as ``qParams``."""
    artefact = _visible_graph(session, slug, user)
    graph = _stored(artefact)
    document = graph_document(
        graph,
        view=_view(session, artefact, view, user),
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    return JSONResponse(
        document,
        headers={"Content-Disposition": f'attachment; filename="tzoo-graph-{slug}.json"'},
    )


@router.patch("/graphs/{slug}", response_model=GraphSummary)
def update(
    slug: str,
    body: GraphUpdate,
    request: Request,
    session: SessionDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> GraphSummary:
    """Change who can see the graph (owner only)."""
    artefact = _owned_graph(session, slug, user)
    artefact.visibility = body.visibility
    session.commit()
    return _summary(request, artefact)


@router.delete("/graphs/{slug}", status_code=204)
def delete(slug: str, session: SessionDep, user: CurrentUserDep, _csrf: CsrfCheckDep) -> Response:
    """Delete the graph, its saved views and its explanations for good (owner only)."""
    artefact = _owned_graph(session, slug, user)
    delete_graph_answers(session, artefact.slug)
    delete_graph(session, artefact)
    return Response(status_code=204)


def _owned_graph(session: Session, slug: str, user: User | None) -> Artefact:
    _visible_graph(session, slug, user)
    return owned_artefact(session, slug, user)


# -- views ----------------------------------------------------------------------------------------


@router.post("/graphs/{slug}/views", status_code=201, response_model=ViewCreated, responses=_ERRORS)
def save_view(
    slug: str,
    body: ViewCreate,
    request: Request,
    session: SessionDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> ViewCreated:
    """Keep the page's view (pinned nodes, supernodes, thresholds, selected node) at a
    permalink; anyone who can see the graph can save one."""
    artefact = _visible_graph(session, slug, user)
    stored = create_view(session, artefact, body.view(), owner=user.username if user else None)
    return ViewCreated(view_id=stored.slug, url=graph_url(request, slug, stored.slug))


@router.get("/graphs/{slug}/views/{view_id}", responses={404: _ERRORS[404]})
def read_view(slug: str, view_id: str, session: SessionDep, user: CurrentUserDep) -> dict[str, Any]:
    """A saved view of the graph."""
    artefact = _visible_graph(session, slug, user)
    return {"id": view_id, **_view(session, artefact, view_id, user).to_dict()}


# -- features -------------------------------------------------------------------------------------


@router.get("/graphs/{slug}/features/{layer}/{index}", responses=_ERRORS)
def dashboard(
    slug: str,
    layer: Annotated[int, Path(ge=0, le=MAX_LAYER)],
    index: Annotated[int, Path(ge=0, le=MAX_FEATURE)],
    session: SessionDep,
    manager: ManagerDep,
    settings: SettingsDep,
    user: CurrentUserDep,
) -> dict[str, Any]:
    """The dashboard of feature ``index`` of ``layer`` of the graph's transcoder set over
    the shipped corpus: top contexts with per-token activations, activation quantiles,
    top and bottom logits, histogram, frequency. Computed once, then stored as an artefact
    whose ``slug`` gives its permalink (``/features/{slug}``)."""
    graph = _stored(_visible_graph(session, slug, user))
    return feature_dashboard(manager, session, settings, graph, layer, index)


@router.post("/graphs/{slug}/interventions", responses=_ERRORS)
def interventions(
    slug: str,
    body: InterventionsRequest,
    session: SessionDep,
    manager: ManagerDep,
    settings: SettingsDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> dict[str, Any]:
    """Scale or set features on the graph's prompt and read the logits at its target
    position before and after (``mode``: ``frozen`` recomputes features with attention
    and norms frozen; ``direct`` moves only the changed feature's decoder vector, exactly
    as the graph's edges predict; ``live`` runs the real model with transcoders)."""
    graph = _stored(_visible_graph(session, slug, user))
    specs = [
        InterventionSpec(i.layer, i.position, i.feature, scale=i.scale, value=i.value)
        for i in body.interventions
    ]
    return run_interventions(manager, settings, graph, specs, mode=body.mode, top_k=body.top_k)


# -- explanations ---------------------------------------------------------------------------------


@router.post(
    "/graphs/{slug}/explanations",
    status_code=202,
    response_model=ExplanationPublic,
    responses={**_ERRORS, 503: {"description": "Too many explanations waiting already"}},
)
def explain(
    slug: str,
    body: ExplanationCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    jobs: ExplanationJobsDep,
    user: CurrentUserDep,
    _csrf: CsrfCheckDep,
) -> ExplanationPublic:
    """Start the circuit agent on the graph's prompt: the ``n_paths`` strongest paths into
    ``target``'s logit at the graph's target position, with labels for their features
    when ``label``. Answers 202 with the job; poll ``GET .../explanations/{id}`` for its
    stage and progress, and for the answer (stored for good under ``explanation_id``).
    A target that is not one token is a 422 at once."""
    artefact = _visible_graph(session, slug, user)
    job = jobs.submit(
        artefact,
        body.target,
        n_paths=body.n_paths,
        label=body.label,
        owner=user.username if user else None,
    )
    response.headers["Location"] = f"/api/graphs/{slug}/explanations/{job.id}"
    return _explanation(request, slug, jobs.status(job))


@router.get(
    "/graphs/{slug}/explanations",
    response_model=list[ExplanationSummary],
    responses={404: _ERRORS[404]},
)
def list_explanations(
    slug: str, request: Request, session: SessionDep, user: CurrentUserDep
) -> list[ExplanationSummary]:
    """The graph's stored explanations that you can see, newest first."""
    artefact = _visible_graph(session, slug, user)
    rows = [
        row
        for row in graph_answers(session, artefact.slug, limit=MAX_LISTED_ANSWERS)
        if can_view(row, user)
    ]
    return [
        ExplanationSummary(**answer_summary(row), url=explanation_url(request, slug, row.slug))
        for row in rows
    ]


@router.get(
    "/graphs/{slug}/explanations/{explanation_id}",
    response_model=ExplanationPublic,
    responses={404: _ERRORS[404]},
)
def read_explanation(
    slug: str,
    explanation_id: str,
    request: Request,
    session: SessionDep,
    jobs: ExplanationJobsDep,
    user: CurrentUserDep,
) -> ExplanationPublic:
    """A job (``state`` queued, running, done or failed; ``stage`` and ``done``/``total``
    while running; the answer and its ``explanation_id`` when done), or a stored
    explanation by that id (as a done job). Finished jobs are forgotten after a while;
    their answers stay at ``explanation_id``. A job whose answer will be private is its
    owner's: anyone else gets the 404 of an unknown id."""
    artefact = _visible_graph(session, slug, user)
    try:
        job = jobs.get(explanation_id, artefact.slug)
        if not job.visible_to(user.username if user else None):
            raise NoSuchExplanationError(explanation_id)
        status = jobs.status(job)
    except NoSuchExplanationError:
        status = _saved_explanation(session, artefact, explanation_id, user)
    return _explanation(request, slug, status)


# -- pages ----------------------------------------------------------------------------------------


@pages.get("/graph", response_class=HTMLResponse)
def graph_form_page(request: Request, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    """The form: model, transcoder set, prompt; and the latest public graphs."""
    sets = list_transcoder_sets(settings)
    # The catalogue, not ModelManager.status(): that one sizes every model (seconds).
    decoders = [spec.name for spec in catalogue() if spec.architecture == "decoder"]
    models = [name for name in decoders if name in sets] + sorted(
        name for name in sets if name not in decoders
    )
    recent = list_artefacts(session, kind=GRAPH_KIND, limit=20)
    context = {
        "models": models,
        "untrained": [name for name in decoders if name not in sets],
        "sets": {name: [info.to_dict() for info in found] for name, found in sets.items()},
        "train_command": TRAIN_COMMAND.format(model="smollm2-135m"),
        "recent": [_summary(request, a) for a in recent],
        "defaults": {
            "node_threshold": DEFAULT_NODE_THRESHOLD,
            "edge_threshold": DEFAULT_EDGE_THRESHOLD,
            "max_feature_nodes": DEFAULT_MAX_FEATURE_NODES,
            "max_prompt_chars": MAX_PROMPT_CHARS,
        },
    }
    return request.app.state.templates.TemplateResponse(request, "circuits/form.html", context)


@pages.get("/graph/{slug}", response_class=HTMLResponse)
def graph_page(
    slug: str,
    request: Request,
    session: SessionDep,
    user: CurrentUserDep,
    view: ViewQuery = None,
    explanation: ExplanationQuery = None,
) -> HTMLResponse:
    """One stored graph; ``?view=ID`` restores a saved view, ``?explanation=ID`` shows a
    stored explanation."""
    artefact = _visible_graph(session, slug, user)
    _stored(artefact)
    _view(session, artefact, view, user)  # a 404 now rather than a broken page
    if explanation is not None:
        _saved_explanation(session, artefact, explanation, user)
    page = {
        "slug": slug,
        "api": f"/api/graphs/{slug}",
        "view": view,
        "explanation": explanation,
        "max_paths": MAX_PATHS,
        "default_paths": DEFAULT_PATHS,
        "max_target_chars": MAX_TARGET_CHARS,
        "model_name": artefact.model_name,
        "prompt": artefact.input_text,
        "transcoders": artefact.params["transcoders"]["id"],
        "is_owner": is_owner(artefact, user),
        "user": user.username if user else "",
    }
    return request.app.state.templates.TemplateResponse(
        request, "circuits/graph.html", {"graph": page}
    )
