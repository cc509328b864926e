"""The lens service's job queue: FIFO, position updates, timeouts, cancel and interrupt,
and dynamic batching.

Everything that changes the queue runs on the event loop (one thread), so the queue needs
no lock; the analyses run on a thread pool of ``num_workers`` threads and talk back
through ``loop.call_soon_threadsafe``. A worker takes the oldest request whose model no
other worker is running (hooks sit on the shared model, so one model runs one thing at a
time) and, with dynamic batching on, every later queued lens request for the same group,
analysis and options, up to ``auto_batch_size_max``: they run in one padded forward pass.

Stopping: ``cancel`` drops a queued request, or asks a running one to stop; ``interrupt``
asks a running one to stop and keep what it has. A verbalisation checks between batches
of positions and returns the rows so far; a lens is one forward pass and finishes. The
per-request timeout (``request_timeout``, counted from submission) stops the same way.

Events for a request go to its listener (the WebSocket that sent it), as JSON text:
queued, queue_update, progress, completed, request_cancelled, error. Results are kept
as JSON text for ``job_retention_seconds`` for ``GET /status``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from tzoo.analyses.attention import EmptyInputError
from tzoo.analyses.lens import count_tokens, logit_lens_batch
from tzoo.analyses.verbalize import VerbalizeRow, verbalize
from tzoo.config import Settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager
from tzoo.service.metrics import ServiceMetrics
from tzoo.service.model_groups import ModelGroup, ModelGroups, TunedLensMissingError

Analysis = Literal["logit_lens", "tuned_lens", "verbalize"]
ANALYSES: tuple[Analysis, ...] = ("logit_lens", "tuned_lens", "verbalize")
LENS_ANALYSES = frozenset({"logit_lens", "tuned_lens"})
# Finished requests kept for /status, at most; the oldest go first.
MAX_RETAINED = 1000
# Bounds on layer and position numbers in options (negative: from the end); far above any
# model, so an absurd value is a 422 at the door rather than an overflow inside.
MAX_LAYER = 10_000
MAX_POSITION = 1_000_000
Listener = Callable[[str], None]


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue_size`` requests already."""


class RequestNotFoundError(LookupError):
    pass


class TextTooLongError(ValueError):
    def __init__(self, length: int, limit: int) -> None:
        self.length, self.limit = length, limit
        super().__init__(
            f"The text is {length} characters; the limit is {limit} (TZOO_MAX_TEXT_LENGTH)."
        )


class RequestTimeoutError(TimeoutError):
    pass


class JobOptions(BaseModel):
    """Options of a lens request; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # StrictInt: JSON true/false is no number here (pydantic would take it as 1/0).
    k: StrictInt = Field(
        5, ge=1, le=50, description="Top tokens kept per layer and position (lens)"
    )
    layer: StrictInt | None = Field(
        None,
        ge=-MAX_LAYER,
        le=MAX_LAYER,
        description="Source layer (verbalize); default: the group's verbalize_layer",
    )
    target_layer: StrictInt | None = Field(
        None,
        ge=-MAX_LAYER,
        le=MAX_LAYER,
        description="Layer the vector is written at in the identity prompt (verbalize)",
    )
    positions: tuple[Annotated[StrictInt, Field(ge=-MAX_POSITION, le=MAX_POSITION)], ...] | None = (
        Field(
            None, max_length=4096, description="Token positions to explain (verbalize; default all)"
        )
    )
    max_new_tokens: StrictInt = Field(8, ge=1, le=64, description="Words per explanation, at most")
    identity_prompt: str | None = Field(None, min_length=1, max_length=2000)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


StopReason = Literal["cancel", "interrupt", "timeout"]


@dataclass(eq=False)
class Job:
    id: str
    analysis: Analysis
    group: ModelGroup
    text: str
    options: JobOptions
    client_id: str | None = None  # the WebSocket connection that sent it, if any
    # Who sent it: "user:<id>", "operator", "ws:<connection>" or "ip:<address>" (see
    # routes/lens_service); status and cancel of someone else's request are a 404.
    owner: str | None = None
    listener: Listener | None = None
    client_request_id: str | None = None  # the client's own tag, echoed in "queued"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    status: JobStatus = JobStatus.QUEUED
    progress: dict[str, Any] | None = None
    result_json: str | None = None  # kept as JSON text: a long lens is megabytes of lists
    error: dict[str, Any] | None = None
    stop_reason: StopReason | None = None
    last_position: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    @property
    def done(self) -> bool:
        return self.status not in (JobStatus.QUEUED, JobStatus.RUNNING)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.created

    def batch_key(self) -> tuple[str, str, JobOptions]:
        return (self.group.name, self.analysis, self.options)


@dataclass(eq=False)
class _Run:
    loop: asyncio.AbstractEventLoop
    changed: asyncio.Event
    executor: ThreadPoolExecutor
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class _Outcome:
    job: Job
    status: JobStatus
    result: dict[str, Any] | None = None
    error: BaseException | None = None


def message(fields: dict[str, Any], result_json: str | None = None) -> str:
    """A JSON message of ``fields`` plus ``"result"``, pasted in as already-encoded text."""
    body = json.dumps(fields)
    if result_json is None:
        return body
    return body[:-1] + (', "result": ' if fields else '"result": ') + result_json + "}"


class JobQueue:
    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        groups: ModelGroups,
        metrics: ServiceMetrics,
        *,
        describe_error: Callable[[BaseException], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.groups = groups
        self.metrics = metrics
        self.describe_error = describe_error  # error -> {error, message, status}
        self._pending: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._running: set[Job] = set()
        self._busy_models: set[str] = set()
        # One run per lifespan that started the queue; nested lifespans of one app (as
        # tests do) each get their own loop, workers and pool, the innermost serving.
        self._runs: list[_Run] = []
        metrics.bind(
            queue_size=lambda: len(self._pending),
            running=lambda: len(self._running),
            models_loaded=lambda: len(manager.loaded_names()),
            model_bytes=lambda: manager.used_bytes,
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        run = _Run(
            loop, asyncio.Event(), ThreadPoolExecutor(self.settings.num_workers, "tzoo-lens")
        )
        run.tasks = [
            asyncio.create_task(self._worker(run), name=f"tzoo-lens-worker-{i}")
            for i in range(self.settings.num_workers)
        ]
        run.tasks.append(asyncio.create_task(self._janitor(), name="tzoo-lens-janitor"))
        self._runs.append(run)

    async def stop(self) -> None:
        """Stop the run this event loop started; the last one also stops running jobs."""
        loop = asyncio.get_running_loop()
        run = next((r for r in self._runs if r.loop is loop), None)
        if run is None:
            return
        self._runs.remove(run)
        if not self._runs:
            for job in list(self._running):
                job.request_stop("cancel")
        for task in run.tasks:
            task.cancel()
        await asyncio.gather(*run.tasks, return_exceptions=True)
        run.executor.shutdown(wait=False, cancel_futures=True)
        if self._runs:  # the outer run serves again: let it look at the queue
            outer = self._runs[-1]
            if not outer.loop.is_closed():
                outer.loop.call_soon_threadsafe(outer.changed.set)

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._runs[-1].loop if self._runs else None

    # -- requests --------------------------------------------------------------------------
    def submit(
        self,
        text: str,
        analysis: Analysis,
        *,
        group: str | None = None,
        options: JobOptions | None = None,
        client_id: str | None = None,
        owner: str | None = None,
        listener: Listener | None = None,
        client_request_id: str | None = None,
    ) -> Job:
        """Queue a request (on the event loop); what is wrong with it raises at once."""
        if self._loop is None:
            raise RuntimeError(
                "The lens queue has not been started (the app's lifespan starts it)."
            )
        if not text or not text.strip():
            raise EmptyInputError("The text is empty; give the model something to read.")
        if len(text) > self.settings.max_text_length:
            raise TextTooLongError(len(text), self.settings.max_text_length)
        if analysis not in ANALYSES:
            raise ValueError(f"Unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}.")
        model_group = self.groups.resolve(group)
        if analysis == "tuned_lens" and not self.groups.has_tuned_lens(model_group):
            self.groups.tuned_lens(model_group)  # raises TunedLensMissingError with the fix
        if len(self._pending) >= self.settings.max_queue_size:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFullError(
                f"The queue is full ({self.settings.max_queue_size} requests waiting); "
                "try again shortly."
            )
        job = Job(
            id=uuid.uuid4().hex,
            analysis=analysis,
            group=model_group,
            text=text,
            options=options or JobOptions(),
            client_id=client_id,
            owner=owner,
            listener=listener,
            client_request_id=client_request_id,
        )
        self._jobs[job.id] = job
        self._pending.append(job)
        job.last_position = len(self._pending)
        job._timer = self._loop.call_later(self.settings.request_timeout, self._time_out, job)
        self._emit(
            job,
            {
                "type": "queued",
                "request_id": job.id,
                "position": job.last_position,
                "queue_size": len(self._pending),
                "client_request_id": client_request_id,
            },
        )
        self._wake()
        return job

    def get(
        self, request_id: str, client_id: str | None = None, *, owner: str | None = None
    ) -> Job:
        """The request ``request_id``; with ``client_id`` (a connection) or ``owner`` (a
        sender) only if it is theirs: someone else's is as unknown as a made-up id."""
        job = self._jobs.get(request_id)
        if (
            job is None
            or (client_id is not None and job.client_id != client_id)
            or (owner is not None and job.owner != owner)
        ):
            raise RequestNotFoundError(
                f"No request {request_id!r}"
                + (" from this connection." if client_id is not None else "; it may have expired.")
            )
        return job

    def position(self, job: Job) -> int | None:
        """1-based place in the queue; 0 while running; None when finished."""
        if job.status is JobStatus.RUNNING:
            return 0
        if job.status is JobStatus.QUEUED:
            return self._pending.index(job) + 1
        return None

    def status_fields(self, job: Job) -> dict[str, Any]:
        """What ``GET /status`` and the WebSocket's status answer say (result aside)."""
        fields: dict[str, Any] = {
            "request_id": job.id,
            "status": str(job.status),
            "analysis": job.analysis,
            "model_group": job.group.name,
            "position": self.position(job),
            "queue_size": len(self._pending),
            "progress": job.progress,
            "elapsed_s": round(job.elapsed, 3),
        }
        if job.error is not None:
            fields["error"] = job.error
        return fields

    def overview(self) -> dict[str, Any]:
        return {
            "queue_size": len(self._pending),
            "running": len(self._running),
            "max_queue_size": self.settings.max_queue_size,
        }

    def requests_of(self, client_id: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.client_id == client_id and not j.done]

    def cancel(self, request_id: str, client_id: str | None = None) -> Job:
        """Drop a queued request (request_cancelled at once) or ask a running one to stop
        (request_cancelled, with what it has, when it does). Finished: nothing to do."""
        job = self.get(request_id, client_id)
        if job.status is JobStatus.QUEUED:
            self._pending.remove(job)
            self._finish(job, _Outcome(job, JobStatus.CANCELLED))
            self._publish_positions()
        elif job.status is JobStatus.RUNNING:
            job.request_stop("cancel")
        return job

    def interrupt(self, request_id: str, client_id: str | None = None) -> Job:
        """Stop a running request and keep what it has (``completed`` with
        ``result.complete`` false); a queued one has nothing to keep, so it is cancelled."""
        job = self.get(request_id, client_id)
        if job.status is JobStatus.RUNNING:
            job.request_stop("interrupt")
            return job
        return self.cancel(request_id, client_id)

    def cancel_client(self, client_id: str) -> int:
        """Cancel every unfinished request of ``client_id`` (its connection closed)."""
        jobs = self.requests_of(client_id)
        for job in jobs:
            job.listener = None
            self.cancel(job.id)
        return len(jobs)

    # -- events ----------------------------------------------------------------------------
    def _emit(self, job: Job, fields: dict[str, Any], result_json: str | None = None) -> None:
        if job.listener is not None:
            try:
                job.listener(message(fields, result_json))
            except Exception:  # a dead listener never stops the queue
                logger.opt(exception=True).warning("Dropping a lens event for {}", job.id)
                job.listener = None

    def _emit_threadsafe(self, job: Job, fields: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._emit, job, fields)

    def _publish_positions(self) -> None:
        size = len(self._pending)
        for index, job in enumerate(self._pending, start=1):
            if job.last_position != index:
                job.last_position = index
                self._emit(
                    job,
                    {
                        "type": "queue_update",
                        "request_id": job.id,
                        "position": index,
                        "queue_size": size,
                    },
                )

    def _wake(self) -> None:
        if self._runs:
            self._runs[-1].changed.set()

    # -- workers ---------------------------------------------------------------------------
    async def _worker(self, run: _Run) -> None:
        while True:
            if self._worth_waiting():
                await asyncio.sleep(self.settings.batch_wait_ms / 1000)
            batch = self._take_batch()
            if not batch:
                run.changed.clear()
                await run.changed.wait()
                continue
            model = batch[0].group.model
            self._busy_models.add(model)
            self.metrics.batch_size.observe(len(batch))
            try:
                outcomes = await run.loop.run_in_executor(run.executor, self._run, batch)
            except Exception as exc:  # the pool itself failed: report, keep serving
                logger.opt(exception=exc).error("A lens batch failed outside its analysis")
                outcomes = [_Outcome(job, JobStatus.FAILED, error=exc) for job in batch]
            finally:
                self._busy_models.discard(model)
            for outcome in outcomes:
                self._running.discard(outcome.job)
                self._finish(outcome.job, outcome)
            self._wake()  # a job for this model may be waiting for another worker

    def _worth_waiting(self) -> bool:
        """Whether the next batch would be a lens batch short of its maximum: then a
        moment's wait lets requests that are on their way join it."""
        if not self.settings.dynamic_batching or self.settings.batch_wait_ms <= 0:
            return False
        head = self._next_head()
        if head is None or head.analysis not in LENS_ANALYSES:
            return False
        key = head.batch_key()
        same = sum(1 for job in self._pending if job.batch_key() == key)
        return same < self.settings.auto_batch_size_max

    def _next_head(self) -> Job | None:
        return next((j for j in self._pending if j.group.model not in self._busy_models), None)

    def _take_batch(self) -> list[Job]:
        head = self._next_head()
        if head is None:
            return []
        batch = [head]
        if self.settings.dynamic_batching and head.analysis in LENS_ANALYSES:
            key = head.batch_key()
            for job in self._pending:
                if len(batch) >= self.settings.auto_batch_size_max:
                    break
                if job is not head and job.batch_key() == key:
                    batch.append(job)
        for job in batch:
            self._pending.remove(job)
            self._running.add(job)
            job.status = JobStatus.RUNNING
            job.started = time.monotonic()
            job.last_position = 0
            # "loading" only when the model really has to load; else it starts at once.
            stage = "running" if self.manager.is_loaded(job.group.model) else "loading"
            job.progress = {"stage": stage, "done": 0, "total": 1}
            self._emit(job, {"type": "progress", "request_id": job.id, **job.progress})
        self._publish_positions()
        return batch

    def _finish(self, job: Job, outcome: _Outcome) -> None:
        if job._timer is not None:
            job._timer.cancel()
        job.finished = time.monotonic()
        status = outcome.status
        if outcome.result is not None:
            outcome.result["complete"] = outcome.result.get("complete", True)
            job.result_json = json.dumps(outcome.result)
        base = {"request_id": job.id, "elapsed_s": round(job.elapsed, 3)}
        if status in (JobStatus.COMPLETED, JobStatus.INTERRUPTED):
            job.status = status
            self._emit(job, {"type": "completed", **base, "status": str(status)}, job.result_json)
        elif status is JobStatus.CANCELLED:
            job.status = status
            self._emit(job, {"type": "request_cancelled", **base}, job.result_json or "null")
        else:
            job.status = status
            error = outcome.error or RequestTimeoutError("The request failed.")
            job.error = self.describe_error(error)
            self._emit(job, {"type": "error", **base, **job.error}, job.result_json)
        self.prune()
        self.metrics.requests.labels(job.analysis, str(job.status)).inc()
        self.metrics.latency.labels(job.analysis).observe(job.elapsed)

    def _time_out(self, job: Job) -> None:
        limit = self.settings.request_timeout
        if job.status is JobStatus.QUEUED:
            self._pending.remove(job)
            error = RequestTimeoutError(
                f"The request waited {limit:g} s in the queue without starting "
                "(TZOO_REQUEST_TIMEOUT); try again when the server is less busy."
            )
            self._finish(job, _Outcome(job, JobStatus.TIMED_OUT, error=error))
            self._publish_positions()
        elif job.status is JobStatus.RUNNING:
            job.request_stop("timeout")

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.settings.job_retention_seconds))
            self.prune()

    def prune(self) -> int:
        """Forget finished requests older than the retention, past MAX_RETAINED, or past
        ``job_results_max_mb`` of kept results, oldest first."""
        now = time.monotonic()
        finished = sorted(
            (j for j in self._jobs.values() if j.done and j.finished is not None),
            key=lambda j: j.finished or 0.0,
        )
        budget = self.settings.job_results_max_mb * 2**20
        kept_bytes = sum(len(j.result_json or "") for j in finished)
        dropped = 0
        for index, job in enumerate(finished):
            expired = now - (job.finished or now) > self.settings.job_retention_seconds
            too_many = len(finished) - index > MAX_RETAINED
            if not (expired or too_many or kept_bytes > budget):
                break  # the rest are newer
            kept_bytes -= len(job.result_json or "")
            del self._jobs[job.id]
            dropped += 1
        return dropped

    # -- running (on a worker thread) ------------------------------------------------------
    def _run(self, batch: list[Job]) -> list[_Outcome]:
        group = batch[0].group
        try:
            if not self.manager.is_loaded(group.model):
                logger.info("Loading model group {} for the lens service", group.name)
            handle = self.groups.handle(group)
        except Exception as exc:
            return [_Outcome(job, JobStatus.FAILED, error=exc) for job in batch]
        with self.manager.use(group.model, exclusive=True):
            if batch[0].analysis in LENS_ANALYSES:
                return self._run_lens(handle, batch)
            return [self._run_verbalize(handle, job) for job in batch]

    def _run_lens(self, handle: ModelHandle, batch: list[Job]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        live: list[tuple[Job, int]] = []
        for job in batch:
            if job.stop_reason == "cancel":
                outcomes.append(_Outcome(job, JobStatus.CANCELLED))
                continue
            try:
                live.append((job, count_tokens(handle, job.text)))
            except ValueError as exc:
                outcomes.append(_Outcome(job, JobStatus.FAILED, error=exc))
        if not live:
            return outcomes
        head = live[0][0]
        try:
            lens = self.groups.tuned_lens(head.group) if head.analysis == "tuned_lens" else None
        except (TunedLensMissingError, ValueError) as exc:
            return outcomes + [_Outcome(job, JobStatus.FAILED, error=exc) for job, _ in live]
        for chunk in _by_padded_tokens(live, self.settings.lens_batch_max_tokens):
            for job in chunk:
                job.progress = {"stage": "running", "done": 0, "total": 1}
                self._emit_threadsafe(
                    job, {"type": "progress", "request_id": job.id, **job.progress}
                )
            try:
                results = logit_lens_batch(
                    handle, [job.text for job in chunk], k=head.options.k, lens=lens
                )
            except Exception as exc:
                outcomes += [_Outcome(job, JobStatus.FAILED, error=exc) for job in chunk]
                continue
            for job, result in zip(chunk, results, strict=True):
                job.progress = {"stage": "running", "done": 1, "total": 1}
                payload = {
                    "analysis": job.analysis,
                    "model_group": job.group.name,
                    "k": job.options.k,
                }
                payload |= result.to_dict()
                status = JobStatus.CANCELLED if job.stop_reason == "cancel" else JobStatus.COMPLETED
                outcomes.append(
                    _Outcome(job, status, result=None if status is JobStatus.CANCELLED else payload)
                )
        return outcomes

    def _run_verbalize(self, handle: ModelHandle, job: Job) -> _Outcome:
        if job.stop_reason == "cancel":
            return _Outcome(job, JobStatus.CANCELLED)
        options = job.options
        layer = options.layer
        if layer is None:
            layer = job.group.verbalize_layer
        if layer is None:
            layer = max(1, _n_layers(handle) // 4)
        fresh: list[VerbalizeRow] = []

        def on_rows(rows: list[VerbalizeRow]) -> None:
            fresh.extend(rows)

        def progress(done: int, total: int) -> None:
            rows = [_row_dict(row) for row in fresh]
            fresh.clear()
            job.progress = {"stage": "running", "done": done, "total": total}
            self._emit_threadsafe(
                job, {"type": "progress", "request_id": job.id, **job.progress, "rows": rows}
            )

        extra: dict[str, Any] = {}
        if options.identity_prompt is not None:
            extra["identity_prompt"] = options.identity_prompt
        try:
            result = verbalize(
                handle,
                job.text,
                layer=layer,
                target_layer=options.target_layer,
                positions=list(options.positions) if options.positions is not None else None,
                max_new_tokens=options.max_new_tokens,
                batch_size=self.settings.batch_size,
                progress=progress,
                on_rows=on_rows,
                should_stop=job.should_stop,
                **extra,
            )
        except Exception as exc:
            return _Outcome(job, JobStatus.FAILED, error=exc)
        payload: dict[str, Any] = {"analysis": "verbalize", "model_group": job.group.name}
        payload |= result.to_dict()
        payload["model"] = payload.pop("model_name")
        if result.complete or job.stop_reason is None:
            return _Outcome(job, JobStatus.COMPLETED, result=payload)
        if job.stop_reason == "interrupt":
            return _Outcome(job, JobStatus.INTERRUPTED, result=payload)
        if job.stop_reason == "cancel":
            return _Outcome(job, JobStatus.CANCELLED, result=payload)
        error = RequestTimeoutError(
            f"The request ran past {self.settings.request_timeout:g} s (TZOO_REQUEST_TIMEOUT); "
            f"the {len(result.rows)} rows done so far are in the result."
        )
        return _Outcome(job, JobStatus.TIMED_OUT, result=payload, error=error)


def _row_dict(row: VerbalizeRow) -> dict[str, Any]:
    return {
        "position": row.position,
        "token": row.token,
        "explanation": row.explanation,
        "kl": row.kl,
        "entropy": row.entropy,
        "lens_top": [[token, float(p)] for token, p in row.lens_top],
    }


def _n_layers(handle: ModelHandle) -> int:
    config = handle.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return int(layers) if isinstance(layers, int) else 4


def _by_padded_tokens(jobs: list[tuple[Job, int]], budget: int) -> list[list[Job]]:
    """Split ``(job, n_tokens)`` into batches whose padded size (requests x longest) stays
    within ``budget``; a request longer than the budget runs alone."""
    batches: list[list[Job]] = []
    current: list[Job] = []
    longest = 0
    for job, n in sorted(jobs, key=lambda pair: pair[1]):
        if current and (len(current) + 1) * max(longest, n) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(job)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches
