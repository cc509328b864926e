"""ModelManager: which models are in memory, within a budget, shared by every request.

- A memory budget: loading a model first evicts the least recently used ones that are not
  in use; a model that cannot fit at all is refused before any weights are read.
- One load per model: when two requests ask for the same model at once, the second waits
  for the first one's load instead of starting its own.
- Unload really frees memory (weights moved off the accelerator, references dropped, gc,
  the CUDA cache emptied, freed heap pages handed back to the system).
- Holders: something that keeps working state on a model between requests (a token-wheel
  session and its key/value cache) registers as a named *holder*. ``pin`` keeps its model
  loaded: a pinned model is never evicted, and ``unload`` refuses it with ModelBusyError
  naming its users (HTTP 409), as it does for a running analysis (``use``); nothing
  unloads a model under a session that would then quietly load it again. ``reserve``
  counts the holder's bytes in the budget next to the models' (``used_bytes`` is both).
  A reservation that does not fit, even after evicting idle models, is refused with
  MemoryBudgetError (HTTP 507) naming TZOO_MEMORY_BUDGET_MB: another user's session is
  never dropped to make room, since its owner would lose their work without being told.
  ``release`` drops the holder's pin and reservation.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger

from tzoo.config import Settings
from tzoo.runtime.catalogue import ModelSpec, catalogue, resolve
from tzoo.runtime.devices import resolve_device, resolve_dtype
from tzoo.runtime.errors import (
    ModelError,
    ModelLoadError,
    ModelTooLargeError,
    ModelUnavailableError,
    UnknownModelError,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.sources import LoadOptions, PackageDirSource

ProgressFn = Callable[[str], None]


RUNNING_ANALYSIS = "running analysis"
BUDGET_SETTING = "TZOO_MEMORY_BUDGET_MB"


class ModelBusyError(ModelError):
    """The model is in use (a running analysis, a token-wheel session) and cannot be
    unloaded right now. ``users``: who holds it, in words. HTTP 409."""

    def __init__(self, name: str, users: list[str]) -> None:
        self.name = name
        self.users = users
        hint = "try again when they end"
        if any(RUNNING_ANALYSIS not in user for user in users):
            hint += ", or delete the sessions"
        super().__init__(f"Model {name!r} is in use by {_and(users)}; {hint}.")


class MemoryBudgetError(ModelError):
    """A holder's working memory (a token-wheel session's key/value cache) does not fit in
    the memory budget, even after evicting idle models. HTTP 507."""

    def __init__(self, kind: str, needed: int, free: int, budget: int, reserved: int) -> None:
        self.needed_bytes = needed
        self.free_bytes = free
        self.budget_bytes = budget
        super().__init__(
            f"A {kind} needs {_mib(needed)} more, but only {_mib(free)} of the memory budget "
            f"({BUDGET_SETTING}, {_mib(budget)}) is free: models in use take the rest, and "
            f"{_mib(reserved)} is held by token-wheel sessions and other work kept between "
            f"requests. Delete a session you no longer need, or try again when idle ones "
            f"expire."
        )


@dataclass
class _Holder:
    """Something that keeps state between requests: the model it pins, the bytes it holds."""

    kind: str  # in words, singular: "token-wheel session"
    model: str | None = None
    nbytes: int = 0


@dataclass(frozen=True)
class ModelStatus:
    name: str
    description: str
    architecture: str
    loaded: bool
    available: bool
    unavailable_reason: str
    size_bytes: int | None
    source: str
    tags: tuple[str, ...]
    device: str | None
    dtype: str | None


class ModelManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._handles: OrderedDict[str, ModelHandle] = OrderedDict()  # oldest use first
        self._loading: dict[str, Future[ModelHandle]] = {}
        self._in_use: Counter[str] = Counter()  # running analyses (``use``), per model
        self._holders: dict[str, _Holder] = {}  # holder id -> what it pins and reserves
        self.load_count: Counter[str] = Counter()  # how many real loads happened, per name

    # -- queries -----------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self.settings.memory_budget_bytes

    @property
    def used_bytes(self) -> int:
        """The loaded models' bytes plus every holder's reservation."""
        with self._lock:
            return self._model_bytes() + self._reserved_bytes()

    @property
    def model_bytes(self) -> int:
        """The loaded models' bytes alone."""
        with self._lock:
            return self._model_bytes()

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by holders (token-wheel sessions' key/value caches)."""
        with self._lock:
            return self._reserved_bytes()

    def _model_bytes(self, *, leave_out: str | None = None) -> int:
        return sum(h.size_bytes for n, h in self._handles.items() if n != leave_out)

    def _reserved_bytes(self) -> int:
        return sum(holder.nbytes for holder in self._holders.values())

    def users_of(self, name: str) -> list[str]:
        """Who keeps ``name`` from being unloaded, in words, e.g. ["3 token-wheel
        sessions", "1 running analysis"]; empty when nobody does."""
        with self._lock:
            return self._users_of(name)

    def _users_of(self, name: str) -> list[str]:
        kinds = Counter(h.kind for h in self._holders.values() if h.model == name)
        if self._in_use.get(name):
            kinds[RUNNING_ANALYSIS] += self._in_use[name]
        return [_count(n, kind) for kind, n in kinds.items()]

    def _busy(self, name: str) -> bool:
        return bool(self._in_use.get(name)) or any(h.model == name for h in self._holders.values())

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._handles

    def status(self) -> list[ModelStatus]:
        """The catalogue plus any other loaded model, with what is known about each."""
        with self._lock:
            handles = dict(self._handles)
        rows = [self._status_of(spec, handles.get(spec.name)) for spec in catalogue()]
        known = {r.name for r in rows}
        for name, handle in handles.items():
            if name not in known:
                spec = resolve(name, hub_offline=True)
                rows.append(self._status_of(spec, handle))
        return rows

    def _status_of(self, spec: ModelSpec, handle: ModelHandle | None) -> ModelStatus:
        available, reason = spec.source.available()
        size: int | None = handle.size_bytes if handle else None
        if size is None and available:
            dtype = resolve_dtype(self.settings.dtype, resolve_device(self.settings.device))
            try:
                size = spec.source.estimate_bytes(dtype, self.settings.cache_dir)
            except ModelError:
                size = None
        return ModelStatus(
            name=spec.name,
            description=spec.description,
            architecture=handle.architecture if handle else spec.architecture,
            loaded=handle is not None,
            available=available,
            unavailable_reason=reason,
            size_bytes=size,
            source=spec.source.describe(),
            tags=spec.tags,
            device=handle.device if handle else None,
            dtype=str(handle.dtype).removeprefix("torch.") if handle else None,
        )

    # -- loading -----------------------------------------------------------------------
    def get(
        self,
        name: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        progress: ProgressFn | None = None,
    ) -> ModelHandle:
        """The loaded model ``name``, loading it (once, whoever else asks) if needed."""
        spec = resolve(name, hub_offline=self.settings.hub_offline)
        dev = resolve_device(device or self.settings.device)
        dt = resolve_dtype(dtype or self.settings.dtype, dev)
        while True:
            with self._lock:
                handle = self._handles.get(spec.name)
                if handle is not None and handle.device == dev and handle.dtype == dt:
                    self._handles.move_to_end(spec.name)
                    return handle
                future = self._loading.get(spec.name)
                owner = future is None
                if future is None:
                    future = Future()
                    self._loading[spec.name] = future
            if not owner:
                handle = future.result()  # re-raises the loader's error
                if handle.device == dev and handle.dtype == dt:
                    return handle
                continue  # loaded with other settings: go round and load ours
            try:
                handle = self._load(spec, dev, dt, progress)
            except BaseException as exc:
                future.set_exception(exc)
                raise
            else:
                future.set_result(handle)
                return handle
            finally:
                with self._lock:
                    self._loading.pop(spec.name, None)

    @contextmanager
    def use(self, name: str, *, exclusive: bool = False, **kwargs: Any) -> Iterator[ModelHandle]:
        """Hold a model for the length of an analysis: it will not be evicted meanwhile.

        ``exclusive`` also takes the handle's lock, for analyses that install hooks.
        """
        handle = self.get(name, **kwargs)
        with self._lock:
            self._in_use[handle.name] += 1
        try:
            if exclusive:
                with handle.lock:
                    yield handle
            else:
                yield handle
        finally:
            with self._lock:
                self._in_use[handle.name] -= 1
                if self._in_use[handle.name] <= 0:
                    del self._in_use[handle.name]

    def _load(
        self, spec: ModelSpec, device: str, dtype: Any, progress: ProgressFn | None
    ) -> ModelHandle:
        available, reason = spec.source.available()
        if not available:
            if isinstance(spec.source, PackageDirSource):
                raise ModelUnavailableError(f"Model {spec.name!r} is not available: {reason}.")
            raise ModelLoadError(f"Model {spec.name!r} cannot be loaded: {reason}.")
        estimate = spec.source.estimate_bytes(dtype, self.settings.cache_dir)
        if estimate:
            self._check_limits(spec.name, estimate)
            with self._lock:
                self._make_room(estimate, keep=spec.name)
        self.unload(spec.name)  # loaded before with another device/dtype
        logger.info("Loading model {} on {} ({})", spec.name, device, dtype)
        options = LoadOptions(
            device=device,
            dtype=dtype,
            cache_root=self.settings.cache_dir,
            hub_offline=self.settings.hub_offline,
            hub_cache_dir=self.settings.hub_cache_dir,
            progress=progress,
        )
        loaded = spec.source.load(options)
        handle = ModelHandle(
            spec.name, loaded.model, loaded.tokenizer, device, dtype, loaded.location
        )
        del loaded
        try:
            self._check_limits(spec.name, handle.size_bytes)
            with self._lock:
                self._make_room(handle.size_bytes, keep=spec.name)
                self._handles[spec.name] = handle
                self.load_count[spec.name] += 1
        except ModelError:
            handle.release()
            raise
        return handle

    def _check_limits(self, name: str, size: int) -> None:
        limit = self.settings.max_model_size_bytes
        if size > limit:
            raise ModelTooLargeError(
                name, size, limit, "per-model size limit (TZOO_MAX_MODEL_SIZE_MB)"
            )
        if size > self.budget_bytes:
            raise ModelTooLargeError(
                name, size, self.budget_bytes, "memory budget (TZOO_MEMORY_BUDGET_MB)"
            )

    def _make_room(self, needed: int, *, keep: str) -> None:
        """Evict least recently used, idle models until ``needed`` bytes fit. Lock held."""
        used = self._evict_for(needed, keep=keep)
        if used + needed > self.budget_bytes:
            reserved = self._reserved_bytes()
            held = f" and token-wheel sessions hold {_mib(reserved)}" if reserved else ""
            raise ModelTooLargeError(
                keep,
                needed,
                max(self.budget_bytes - used, 0),
                f"memory left in the budget while other models are in use{held}",
            )

    def _evict_for(self, needed: int, *, keep: str | None = None) -> int:
        """Evict least recently used models that nobody uses or pins (never ``keep``) until
        ``needed`` more bytes fit; the bytes then in use, ``keep`` left out. Lock held."""
        used = self._model_bytes(leave_out=keep) + self._reserved_bytes()
        for name in list(self._handles):
            if used + needed <= self.budget_bytes:
                break
            if name == keep or self._busy(name):
                continue
            handle = self._handles.pop(name)
            used -= handle.size_bytes
            logger.info("Evicting model {} to stay within the memory budget", name)
            handle.release()
        return used

    # -- holders: sessions that keep state on a model between requests ------------------
    def pin(self, name: str, holder: str, *, kind: str, **kwargs: Any) -> ModelHandle:
        """Load ``name`` if needed and keep it loaded for ``holder`` until ``release``:
        it is not evicted, and ``unload`` refuses it naming its users. ``kind`` says what
        the holder is, in words ("token-wheel session")."""
        while True:
            handle = self.get(name, **kwargs)
            with self._lock:
                if self._handles.get(handle.name) is handle:  # not evicted meanwhile
                    entry = self._holders.setdefault(holder, _Holder(kind))
                    entry.model = handle.name
                    return handle

    def reserve(
        self, holder: str, nbytes: int, *, kind: str = "reservation", must_fit: bool = True
    ) -> None:
        """Count ``nbytes`` for ``holder`` in the budget (replacing what it had reserved).

        Growing evicts idle models if needed; a growth that still does not fit raises
        MemoryBudgetError and leaves the old reservation. Shrinking always succeeds, and
        so does ``must_fit=False``: it records memory already taken (a measurement after
        the fact), so the next growth is judged on the truth."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            entry = self._holders.get(holder) or _Holder(kind)
            extra = nbytes - entry.nbytes
            if extra > 0 and must_fit:
                used = self._evict_for(extra)
                if used + extra > self.budget_bytes:
                    free = max(self.budget_bytes - used, 0)
                    reserved = self._reserved_bytes()
                    raise MemoryBudgetError(entry.kind, extra, free, self.budget_bytes, reserved)
            entry.nbytes = nbytes
            self._holders[holder] = entry

    def reserved_by(self, holder: str) -> int:
        with self._lock:
            entry = self._holders.get(holder)
            return entry.nbytes if entry else 0

    def release(self, holder: str) -> int:
        """Drop ``holder``'s pin and reservation; the bytes it had reserved."""
        with self._lock:
            entry = self._holders.pop(holder, None)
        return entry.nbytes if entry else 0

    # -- unloading ---------------------------------------------------------------------
    def unload(self, name: str) -> bool:
        """Unload ``name``; True if it was loaded."""
        try:
            key = resolve(name, hub_offline=True).name
        except UnknownModelError:
            if not self.is_loaded(name):
                raise
            key = name
        with self._lock:
            if key in self._handles and self._busy(key):
                raise ModelBusyError(key, self._users_of(key))
            handle = self._handles.pop(key, None)
        if handle is None:
            return False
        logger.info("Unloading model {}", key)
        handle.release()
        return_freed_memory()
        return True

    def unload_all(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle.release()


# -- helpers -------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _count(n: int, kind: str) -> str:
    """ "1 running analysis", "3 token-wheel sessions"."""
    if n == 1:
        return f"1 {kind}"
    plural = kind[:-2] + "es" if kind.endswith("is") else kind + "s"
    return f"{n} {plural}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library, another platform)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and friends have no malloc_trim
        return None
    return trim


def return_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the system: glibc keeps freed heap
    pages (a key/value cache is thousands of mid-sized tensors) in its arenas, so the
    process's resident size would never fall after sessions end; ``malloc_trim(0)``
    releases every free page of every arena. The CUDA caching allocator gives back its
    cached blocks too."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
