"""Validation runs from the web page: queued, run one at a time in a process of their own
(``tzoo.validation.worker``), reported as they go, and stored as artefacts whose slug is
the report's permanent link.

A run validates a catalogue model, or a ``model.py`` (and its ``config.json``) uploaded to
the page. Uploads run code on this server, so they are refused unless the operator turned
them on (``TZOO_VALIDATION_UPLOADS``); even then they run in the worker process, which is
killed when it outlives ``TZOO_VALIDATION_TIMEOUT``, so a model that hangs, crashes or
exits cannot take the server with it (it still runs with the server's rights).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tzoo.config import Settings
from tzoo.runtime.catalogue import resolve
from tzoo.service.lens_jobs import QueueFullError
from tzoo.service.quotas import QuotaExceededError
from tzoo.store.artefacts import create_artefact
from tzoo.store.models import Artefact
from tzoo.validation.registry import registered
from tzoo.validation.report import ValidationReport

VALIDATION_KIND = "validation_report"
MAX_WAITING_JOBS = 8
MAX_FINISHED_JOBS = 64
_TAIL_LINES = 20  # of the worker's stderr, kept for a failure's message
# What a client over TZOO_VALIDATIONS_PER_ACCOUNT is told to wait: about one quick run.
BUSY_RETRY_AFTER = 30


class ValidationRequestError(ValueError):
    """A validation request that cannot run (the message says why)."""


class UploadsDisabledError(PermissionError):
    """Model code uploads are off on this server."""


class UploadTooLargeError(ValueError):
    """An uploaded file over TZOO_VALIDATION_MAX_UPLOAD_KB."""


class NoSuchValidationJobError(LookupError):
    """No job with this id (or it finished long ago and was forgotten)."""


def no_such_job(job_id: str) -> NoSuchValidationJobError:
    """The one answer for an unknown job and for a job the caller may not see."""
    return NoSuchValidationJobError(f"No validation job {job_id!r} (it may have ended long ago).")


class TooManyValidationsError(QuotaExceededError):
    """The client has TZOO_VALIDATIONS_PER_ACCOUNT runs queued or running already."""


@dataclass
class ValidationJob:
    id: str
    label: str  # the model's name as shown
    model_name: str | None  # a catalogue model, or None for an upload
    tiers: tuple[int, ...]
    owner: str | None
    visibility: str
    workdir: Path
    client: str | None = None  # whose quota it counts against (web/deps.client_key)
    state: str = "queued"  # queued | running | done | failed
    done: int = 0
    total: int = 0
    what: str = ""
    slug: str | None = None  # the stored report, once done
    passed: bool | None = None
    error: dict[str, Any] | None = None  # {detail, status}
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    process: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def is_finished(self) -> bool:
        return self.state in ("done", "failed")

    def visible_to(self, username: str | None) -> bool:
        """Whether ``username`` (None: anonymous) may follow the job: a private report's
        job is its owner's alone, as the report is."""
        return self.visibility != "private" or (
            username is not None and self.owner is not None and username == self.owner
        )


class ValidationJobs:
    """The validation jobs of one app (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        max_waiting: int = MAX_WAITING_JOBS,
        max_finished: int = MAX_FINISHED_JOBS,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.max_waiting = max_waiting
        self.max_finished = max_finished
        self._jobs: dict[str, ValidationJob] = {}
        self._queue: deque[str] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tzoo-validate")
        self._lock = threading.Lock()
        self._closed = False

    # -- requests ------------------------------------------------------------------------
    def submit(
        self,
        *,
        model_name: str | None = None,
        model_code: bytes | None = None,
        config: bytes | None = None,
        tiers: tuple[int, ...] = (1, 2),
        checks: tuple[str, ...] | None = None,
        owner: str | None = None,
        visibility: str = "public",
        client: str | None = None,
    ) -> ValidationJob:
        """Queue a validation of catalogue model ``model_name`` or of uploaded
        ``model_code`` (with ``config``). Raises ValidationRequestError, UploadsDisabledError,
        UploadTooLargeError, UnknownModelError and QueueFullError at once, and
        TooManyValidationsError when ``client`` (None: not counted) has
        TZOO_VALIDATIONS_PER_ACCOUNT runs queued or running: each run is a worker process
        of its own that may take gigabytes, so one account cannot fill the queue."""
        if (model_name is None) == (model_code is None):
            raise ValidationRequestError("Give either a catalogue model or a model.py file.")
        if not tiers or not set(tiers) <= {1, 2, 3, 4}:
            raise ValidationRequestError(f"Tiers are 1, 2, 3 and 4; got {list(tiers)}.")
        if checks is not None:
            known = {spec.name for spec in registered()}
            unknown = [name for name in checks if name not in known]
            if unknown or not checks:
                raise ValidationRequestError(
                    f"No check named {', '.join(unknown) or '(none given)'}; the checks are "
                    f"{', '.join(sorted(known))}."
                )
        limit = self.settings.validation_max_upload_kb * 1024
        parsed_config: dict[str, Any] | None = None
        if config is not None:
            if len(config) > limit:
                raise UploadTooLargeError(
                    f"The config is {len(config)} bytes; the limit is {limit} "
                    "(TZOO_VALIDATION_MAX_UPLOAD_KB)."
                )
            try:
                parsed_config = json.loads(config.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValidationRequestError(f"The config is not JSON: {error}") from None
            if not isinstance(parsed_config, dict):
                raise ValidationRequestError("The config must be a JSON object.")
        if model_code is not None:
            if not self.settings.validation_uploads:
                raise UploadsDisabledError(
                    "This server does not run uploaded model code: a model.py is Python that "
                    "would run here with the server's rights. Its operator can allow it with "
                    "TZOO_VALIDATION_UPLOADS=true; or run `tzoo validate model.py --config "
                    "config.json` on your own machine."
                )
            if len(model_code) > limit:
                raise UploadTooLargeError(
                    f"The model file is {len(model_code)} bytes; the limit is {limit} "
                    "(TZOO_VALIDATION_MAX_UPLOAD_KB)."
                )
            try:
                model_code.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationRequestError("The model file is not UTF-8 text.") from None
            label = str((parsed_config or {}).get("name") or "model.py")
        else:
            assert model_name is not None
            label = model_name = resolve(model_name, hub_offline=self.settings.hub_offline).name
        job_id = uuid.uuid4().hex
        workdir = self.settings.data_dir / "validation_jobs" / job_id
        job = ValidationJob(
            job_id,
            label,
            model_name,
            tuple(sorted(set(tiers))),
            owner,
            visibility,
            workdir,
            client=client,
        )
        with self._lock:
            if self._closed:
                raise QueueFullError("The server is shutting down; try again when it is back.")
            self._check_client_quota(client)
            waiting = sum(not j.is_finished for j in self._jobs.values())
            if waiting >= self.max_waiting:
                raise QueueFullError(
                    f"{waiting} validations are queued or running; try again later."
                )
            workdir.mkdir(parents=True)
            spec: dict[str, Any] = {
                "tiers": list(job.tiers),
                "checks": None if checks is None else list(checks),
                "seed": 0,
                "report": str(workdir / "report.json"),
                "output_dir": str(workdir / "output"),
            }
            if model_code is not None:
                (workdir / "model.py").write_bytes(model_code)
                spec["model"] = str(workdir / "model.py")
            else:
                spec["model"] = model_name
            if parsed_config is not None:
                (workdir / "config.json").write_text(json.dumps(parsed_config), encoding="utf-8")
                spec["config"] = str(workdir / "config.json")
            (workdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
            self._jobs[job_id] = job
            self._queue.append(job_id)
        self._executor.submit(self._run, job)
        return job

    def _check_client_quota(self, client: str | None) -> None:
        """Under the lock, so parallel submissions cannot pass the limit together."""
        limit = self.settings.validations_per_account
        if client is None:
            return
        mine = sum(j.client == client and not j.is_finished for j in self._jobs.values())
        if mine >= limit:
            raise TooManyValidationsError(
                f"You have {mine} validations queued or running; at most {limit} at once "
                "(TZOO_VALIDATIONS_PER_ACCOUNT). Wait for one to finish and try again.",
                BUSY_RETRY_AFTER,
            )

    def get(self, job_id: str) -> ValidationJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise no_such_job(job_id)
        return job

    def status(self, job: ValidationJob) -> dict[str, Any]:
        with self._lock:
            position = self._queue.index(job.id) + 1 if job.id in self._queue else None
            return {
                "id": job.id,
                "model": job.label,
                "tiers": list(job.tiers),
                "state": job.state,
                "position": position if job.state == "queued" else None,
                "done": job.done,
                "total": job.total,
                "what": job.what,
                "slug": job.slug,
                "passed": job.passed,
                "error": job.error,
                "elapsed_s": None
                if job.started is None
                else round((job.finished or time.monotonic()) - job.started, 2),
            }

    def shutdown(self) -> None:
        """Stop taking jobs, drop queued ones and kill a running worker."""
        with self._lock:
            self._closed = True
            running = [j.process for j in self._jobs.values() if j.process is not None]
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in running:
            if process.poll() is None:
                process.kill()

    # -- running (on the job thread) ------------------------------------------------------
    def _run(self, job: ValidationJob) -> None:
        with self._lock:
            if job.id in self._queue:
                self._queue.remove(job.id)
            if self._closed:
                return
            job.state, job.started = "running", time.monotonic()
        try:
            report = self._work(job)
            slug = self._store(job, report)
        except _JobFailed as failure:
            self._finish(job, "failed", error={"detail": str(failure), "status": failure.status})
        except Exception as error:  # a bug of ours, not the model's: say so, keep serving
            self._finish(
                job,
                "failed",
                error={"detail": f"Internal error: {type(error).__name__}: {error}", "status": 500},
            )
        else:
            self._finish(job, "done", slug=slug, passed=not report.failed)
        finally:
            shutil.rmtree(job.workdir, ignore_errors=True)
            self._forget_old()

    def _work(self, job: ValidationJob) -> ValidationReport:
        env = {
            **os.environ,
            "TZOO_DATA_DIR": str(self.settings.data_dir),
            "TZOO_CACHE_DIR": str(self.settings.cache_dir),
            "TZOO_DEVICE": self.settings.device,
            "PYTHONUNBUFFERED": "1",
        }
        stderr_path = job.workdir / "stderr.log"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "tzoo.validation.worker", str(job.workdir / "spec.json")],
                cwd=job.workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            with self._lock:
                job.process = process
            timer = threading.Timer(self.settings.validation_timeout, process.kill)
            timer.start()
            last: dict[str, Any] = {}
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    try:
                        message = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the model's own prints
                    if not isinstance(message, dict):
                        continue
                    if "done" in message:
                        with self._lock:
                            job.done, job.total = int(message["done"]), int(message["total"])
                            job.what = str(message.get("what", ""))[:200]
                    last = message
                code = process.wait()
            finally:
                timer.cancel()
                with self._lock:
                    job.process = None
        if code == 2 and "error" in last:
            raise _JobFailed(str(last["error"]), 422)
        if code not in (0, 1):
            if time.monotonic() - (job.started or 0) >= self.settings.validation_timeout:
                raise _JobFailed(
                    f"The validation was stopped after {self.settings.validation_timeout} s "
                    "(TZOO_VALIDATION_TIMEOUT).",
                    504,
                )
            tail = stderr_path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
            raise _JobFailed(
                f"The validation process ended with exit code {code}. Its last lines:\n"
                + "\n".join(tail),
                422,
            )
        report_path = job.workdir / "report.json"
        return ValidationReport.from_dict(json.loads(report_path.read_text(encoding="utf-8")))

    def _store(self, job: ValidationJob, report: ValidationReport) -> str:
        with self.session_factory() as session:
            artefact = create_artefact(
                session,
                kind=VALIDATION_KIND,
                model_name=job.label[:255] or "model",
                input_text=job.label,
                params={
                    "report": report.to_dict(),
                    "source": "catalogue" if job.model_name else "upload",
                    "tiers": list(job.tiers),
                },
                arrays={},
                owner=job.owner,
                visibility=job.visibility,
            )
            return artefact.slug

    def _finish(self, job: ValidationJob, state: str, **fields: Any) -> None:
        with self._lock:
            job.state, job.finished = state, time.monotonic()
            for name, value in fields.items():
                setattr(job, name, value)

    def _forget_old(self) -> None:
        with self._lock:
            finished = sorted(
                (j for j in self._jobs.values() if j.is_finished), key=lambda j: j.finished or 0.0
            )
            for job in finished[: max(0, len(finished) - self.max_finished)]:
                del self._jobs[job.id]


class _JobFailed(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def stored_report(artefact: Artefact) -> ValidationReport:
    """The report stored in ``artefact``; LookupError when it holds none."""
    if artefact.kind != VALIDATION_KIND:
        raise LookupError(f"{artefact.slug} is not a validation report.")
    return ValidationReport.from_dict((artefact.params or {})["report"])
