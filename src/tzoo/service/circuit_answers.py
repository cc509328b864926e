"""The circuit agent on a stored graph: explanations as background jobs, answers kept.

``tzoo.circuits.agent.explain_circuit`` traces the strongest paths from a graph's prompt
into one token's logit and labels the features on them. Labelling runs a language model,
so on a CPU an answer takes tens of seconds: a request is a job. ``ExplanationJobs.submit``
checks what it can at once (the model, the graph's transcoder set, the target token), so
a bad request is refused with the graph routes' errors before anything queues; the job
then runs on a worker thread of its model (one thread per model, so one model's jobs run
one at a time, each holding the model exclusively while the agent's hooks are installed,
as graph computation does), and reports its stage (``loading``, then the agent's
``graph``, ``dashboards``, ``labels``, then ``saving``) with done/total counts. Finished
jobs stay readable in memory, at most ``MAX_FINISHED_JOBS`` of them (the oldest go
first); their answers are stored for good.

**Stored answer** (artefact kind ``circuit_answer``, no arrays): ``params`` hold
``version``, ``graph`` (the graph's slug, also the input text, as views keep it),
``request`` (``target`` as asked, its ``target_token`` id, ``n_paths``, ``label``),
``explainer`` (the labelling model's name, None without labels) and ``answer``
(``CircuitAnswer.to_dict()``, non-finite numbers as None). An answer is as visible as its
graph, like a view: unlisted, or private with a private graph. Its slug is the
``explanation`` of a permalink ``/graph/{graph}?explanation={id}``.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

from loguru import logger
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tzoo.circuits.agent import CircuitAnswer, TargetTokenError, explain_circuit, target_token_id
from tzoo.circuits.labels import Explainer, explainer_from_settings
from tzoo.circuits.replacement import TargetPositionError
from tzoo.circuits.replacement import TranscoderMismatchError as ReplacementMismatchError
from tzoo.config import Settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager
from tzoo.service.circuits import (
    GRAPH_KIND,
    GRAPH_VERSION,
    LOADED_TRANSCODERS,
    GraphRequestError,
    TranscodersChangedError,
    TranscoderSetInfo,
    canonical_model_name,
    find_transcoder_set,
)
from tzoo.service.lens_jobs import QueueFullError
from tzoo.store.artefacts import create_artefact, list_artefacts
from tzoo.store.models import Artefact

ANSWER_KIND = "circuit_answer"
ANSWER_VERSION = 1
MAX_PATHS = 20
DEFAULT_PATHS = 5
MAX_TARGET_CHARS = 200  # one token's text; generous for long byte-level or CJK tokens
MAX_FINISHED_JOBS = 64  # finished jobs kept in memory for polling; their answers are stored
MAX_WAITING_JOBS = 16  # queued or running, all models together: each can take a minute
MAX_LISTED_ANSWERS = 100

JobState = Literal["queued", "running", "done", "failed"]
DescribeError = Callable[[BaseException], dict[str, Any]]
SessionFactory = sessionmaker[Session]


class NoSuchExplanationError(LookupError):
    """No job and no stored answer with this id for this graph."""


@dataclass(frozen=True)
class ExplanationRequest:
    """What was asked: ``target`` as given (a token id or one token's text) and its id."""

    target: str | int
    target_token: int
    n_paths: int
    label: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "target_token": self.target_token,
            "n_paths": self.n_paths,
            "label": self.label,
        }


@dataclass(eq=False)
class ExplanationJob:
    """One explanation in flight or just finished. The worker thread writes its fields
    under the store's lock; ``ExplanationJobs.status`` reads them under it."""

    id: str
    graph_slug: str
    model_name: str
    transcoders: TranscoderSetInfo
    fingerprint: str  # of the set the graph was made with
    prompt: str
    target_position: int
    max_feature_nodes: int | None
    request: ExplanationRequest
    owner: str | None
    visibility: str  # of the stored answer
    state: JobState = "queued"
    stage: str | None = None
    done: int = 0
    total: int = 0
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    explainer: str | None = None
    answer: dict[str, Any] | None = None
    explanation_id: str | None = None
    error: dict[str, Any] | None = None

    @property
    def is_finished(self) -> bool:
        return self.state in ("done", "failed")

    def visible_to(self, username: str | None) -> bool:
        """Whether ``username`` (None: anonymous) may follow the job: one whose answer
        will be private (a private graph's) is its owner's alone, as the answer is."""
        return self.visibility != "private" or (
            username is not None and self.owner is not None and username == self.owner
        )


class ExplanationJobs:
    """The explanation jobs of one app: submit, read back, and the worker threads."""

    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        session_factory: SessionFactory,
        *,
        describe_error: DescribeError,
        max_finished: int = MAX_FINISHED_JOBS,
        max_waiting: int = MAX_WAITING_JOBS,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.session_factory = session_factory
        self.describe_error = describe_error  # error -> {detail, error, status}
        self.max_finished = max_finished
        self.max_waiting = max_waiting
        self._jobs: dict[str, ExplanationJob] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._closed = False
        self._lock = threading.Lock()

    # -- requests (on a request thread) ----------------------------------------------------
    def submit(
        self,
        graph: Artefact,
        target: str | int,
        *,
        n_paths: int = DEFAULT_PATHS,
        label: bool = True,
        owner: str | None = None,
    ) -> ExplanationJob:
        """Queue an explanation of ``target`` on the stored graph ``graph``.

        Raises at once what the graph routes raise: UnknownModelError (the graph's model
        is gone), TranscodersNotTrainedError, UnknownTranscodersError or
        TranscodersChangedError (its transcoder set is gone or retrained),
        GraphRequestError (``n_paths`` outside 1..MAX_PATHS, a target that is not one
        token), and QueueFullError when MAX_WAITING_JOBS wait already. Loads the model (for
        its tokenizer) when it is not loaded."""
        params = graph.params or {}
        if graph.kind != GRAPH_KIND or params.get("version") != GRAPH_VERSION:
            raise GraphRequestError(f"{graph.slug} is not an attribution graph this tzoo reads.")
        if not 1 <= n_paths <= MAX_PATHS:
            raise GraphRequestError(f"n_paths must lie in 1..{MAX_PATHS}; got {n_paths}.")
        model_name = canonical_model_name(self.settings, graph.model_name)
        used = params["transcoders"]
        info = _current_set(self.settings, model_name, used["id"], used["fingerprint"])
        with self.manager.use(model_name) as handle:  # the tokenizer only: no lock needed
            token = _target_token(handle, target)
        job = ExplanationJob(
            id=uuid.uuid4().hex,
            graph_slug=graph.slug,
            model_name=model_name,
            transcoders=info,
            fingerprint=used["fingerprint"],
            prompt=params["prompt"],
            target_position=int(params["target_position"]),
            max_feature_nodes=params.get("max_feature_nodes"),
            request=ExplanationRequest(target, token, n_paths, label),
            owner=owner,
            visibility="private" if graph.visibility == "private" else "unlisted",
        )
        with self._lock:
            waiting = sum(not other.is_finished for other in self._jobs.values())
            if self._closed:
                raise QueueFullError("The server is shutting down; try again when it is back.")
            if waiting >= self.max_waiting:
                raise QueueFullError(
                    f"{waiting} explanations are queued or running already; try again shortly."
                )
            self._jobs[job.id] = job
            executor = self._executors.get(model_name)
            if executor is None:
                executor = ThreadPoolExecutor(1, thread_name_prefix=f"tzoo-explain-{model_name}")
                self._executors[model_name] = executor
        executor.submit(self._run, job)
        return job

    def get(self, job_id: str, graph_slug: str) -> ExplanationJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.graph_slug != graph_slug:
            raise NoSuchExplanationError(f"No explanation {job_id!r} of graph {graph_slug!r}.")
        return job

    def status(self, job: ExplanationJob) -> dict[str, Any]:
        """What a poll sees: state, stage, done/total, place in the model's queue (0:
        running, None: finished), and when done the stored answer's id and the answer."""
        with self._lock:
            position: int | None = None
            if job.state == "queued":
                position = 1 + sum(
                    other.state == "queued"
                    and other.model_name == job.model_name
                    and other.created < job.created
                    for other in self._jobs.values()
                )
            elif job.state == "running":
                position = 0
            return {
                "id": job.id,
                "job_id": job.id,
                "state": job.state,
                "stage": job.stage,
                "done": job.done,
                "total": job.total,
                "position": position,
                "elapsed_s": round((job.finished or time.monotonic()) - job.created, 3),
                "request": job.request.to_dict(),
                "explainer": job.explainer,
                "explanation_id": job.explanation_id,
                "answer": job.answer,
                "error": job.error,
            }

    def shutdown(self) -> None:
        """Drop queued jobs and stop taking new ones (a running job finishes). For the
        app's shutdown: otherwise the worker threads run every queued job before the
        interpreter exits."""
        with self._lock:
            self._closed = True
            executors = list(self._executors.values())
            self._executors.clear()
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)

    # -- running (on the model's worker thread) ----------------------------------------------
    def _run(self, job: ExplanationJob) -> None:
        self._update(job, state="running", stage="loading")
        try:
            answer = self._explain(job)
            self._update(job, stage="saving", done=0, total=1)
            stored = self._store(job, answer)
        except Exception as exc:
            error = self.describe_error(exc)
            self._update(job, state="failed", error=error, finished=time.monotonic())
        else:
            self._update(
                job,
                state="done",
                stage=None,
                done=1,
                answer=stored.params["answer"],
                explanation_id=stored.slug,
                finished=time.monotonic(),
            )
        self._forget_old()

    def _explain(self, job: ExplanationJob) -> CircuitAnswer:
        def progress(stage: str, done: int, total: int) -> None:
            self._update(job, stage=stage, done=done, total=total)

        request = job.request
        with ExitStack() as stack:
            explainer = self._explainer(job, stack) if request.label else None
            handle = stack.enter_context(self.manager.use(job.model_name, exclusive=True))
            # Retrained while the job waited: its features would not be the graph's.
            _current_set(self.settings, job.model_name, job.transcoders.id, job.fingerprint)
            transcoders = LOADED_TRANSCODERS.get(job.transcoders, handle)
            try:
                return explain_circuit(
                    handle,
                    transcoders,
                    job.prompt,
                    request.target_token,
                    target_position=job.target_position,
                    n_paths=request.n_paths,
                    max_feature_nodes=job.max_feature_nodes,
                    label=request.label,
                    explainer=explainer,
                    progress=progress,
                )
            except (TargetTokenError, TargetPositionError, ReplacementMismatchError) as error:
                raise GraphRequestError(str(error)) from None

    def _explainer(self, job: ExplanationJob, stack: ExitStack) -> Explainer:
        """The settings' labeller, closed (an endpoint's client) or held loaded (a local
        model: no eviction mid-labelling) until ``stack`` ends."""
        settings = self.settings
        if not settings.autointerp_url:
            stack.enter_context(self.manager.use(settings.autointerp_model))
        explainer = explainer_from_settings(settings, self.manager)
        close = getattr(explainer, "close", None)
        if callable(close):
            stack.callback(close)
        # The model's name only: an endpoint's URL may name an internal host.
        self._update(job, explainer=settings.autointerp_model)
        return explainer

    def _store(self, job: ExplanationJob, answer: CircuitAnswer) -> Artefact:
        with self.session_factory() as session:
            graph = select(Artefact.id).where(Artefact.slug == job.graph_slug)
            if session.scalar(graph) is None:  # the row only, not its arrays
                raise GraphRequestError(
                    f"Graph {job.graph_slug} was deleted while it was being explained."
                )
            return create_artefact(
                session,
                kind=ANSWER_KIND,
                model_name=job.model_name,
                input_text=job.graph_slug,
                params={
                    "version": ANSWER_VERSION,
                    "graph": job.graph_slug,
                    "request": job.request.to_dict(),
                    "explainer": job.explainer,
                    "answer": _finite(answer.to_dict()),
                },
                arrays={},
                owner=job.owner,
                visibility=job.visibility,
            )

    def _update(self, job: ExplanationJob, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(job, name, value)

    def _forget_old(self) -> None:
        with self._lock:
            finished = sorted(
                (job for job in self._jobs.values() if job.is_finished),
                key=lambda job: job.finished or 0.0,
            )
            for job in finished[: max(0, len(finished) - self.max_finished)]:
                del self._jobs[job.id]


def _current_set(
    settings: Settings, model_name: str, set_id: str, fingerprint: str
) -> TranscoderSetInfo:
    """The set ``set_id`` (TranscodersNotTrainedError, UnknownTranscodersError as the graph
    form gives them), refused as changed when retrained since the graph was made."""
    info = find_transcoder_set(settings, model_name, set_id)
    if info.fingerprint() != fingerprint:
        raise TranscodersChangedError(
            f"The transcoder set {set_id} was retrained after this graph was made, so its "
            "features are not the graph's any more; compute the graph again."
        )
    return info


def _target_token(handle: ModelHandle, target: str | int) -> int:
    try:
        return target_token_id(handle, target)
    except TargetTokenError as error:
        raise GraphRequestError(str(error)) from None


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: the store keeps strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# -- stored answers -------------------------------------------------------------------------------


def _answers(session: Session, graph_slug: str) -> Iterator[Artefact]:
    """Stored answers of the graph ``graph_slug``, newest first (their input text is the
    graph's slug; the match is checked on ``params``, the text search being a LIKE)."""
    offset = 0
    while True:
        rows = list_artefacts(
            session,
            kind=ANSWER_KIND,
            visibility=None,
            text_contains=graph_slug,
            limit=500,
            offset=offset,
        )
        yield from (row for row in rows if (row.params or {}).get("graph") == graph_slug)
        if len(rows) < 500:
            return
        offset += 500


def graph_answers(session: Session, graph_slug: str, *, limit: int | None = None) -> list[Artefact]:
    """The stored answers of the graph, newest first (``limit``: at most that many)."""
    found: list[Artefact] = []
    for row in _answers(session, graph_slug):
        if limit is not None and len(found) >= limit:
            break
        found.append(row)
    return found


def stored_answer(artefact: Artefact, graph_slug: str) -> dict[str, Any]:
    """The stored answer ``artefact`` as ``ExplanationJobs.status`` shows a finished job;
    NoSuchExplanationError unless it is an answer about ``graph_slug``."""
    params = artefact.params or {}
    if (
        artefact.kind != ANSWER_KIND
        or params.get("graph") != graph_slug
        or params.get("version") != ANSWER_VERSION
    ):
        raise NoSuchExplanationError(f"No explanation {artefact.slug!r} of graph {graph_slug!r}.")
    return {
        "id": artefact.slug,
        "job_id": None,
        "state": "done",
        "stage": None,
        "done": 1,
        "total": 1,
        "position": None,
        "elapsed_s": None,
        "request": params["request"],
        "explainer": params["explainer"],
        "explanation_id": artefact.slug,
        "answer": params["answer"],
        "error": None,
    }


def answer_summary(artefact: Artefact) -> dict[str, Any]:
    """What a list of a graph's answers shows of one."""
    params = artefact.params
    answer = params["answer"]
    return {
        "id": artefact.slug,
        "target": params["request"]["target"],
        "target_token": answer["target_token"],
        "target_text": answer["target_text"],
        "target_probability": answer["target_probability"],
        "n_paths": len(answer["paths"]),
        "label": params["request"]["label"],
        "owner": artefact.owner,
        "created_at": artefact.created_at.isoformat(),
    }


def delete_graph_answers(session: Session, graph_slug: str) -> int:
    """Delete the stored answers of a graph (with the graph); how many there were."""
    rows = graph_answers(session, graph_slug)
    for row in rows:
        session.delete(row)
    session.commit()
    if rows:
        logger.info("Deleted {} explanations of graph {}", len(rows), graph_slug)
    return len(rows)


__all__ = [
    "ANSWER_KIND",
    "MAX_PATHS",
    "ExplanationJob",
    "ExplanationJobs",
    "ExplanationRequest",
    "NoSuchExplanationError",
    "answer_summary",
    "delete_graph_answers",
    "graph_answers",
    "stored_answer",
]
