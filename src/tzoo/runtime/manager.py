"""ModelManager: which models are in memory, within a budget, shared by every request.

- A memory budget: loading a model first evicts the least recently used ones that are not
  in use; a model that cannot fit at all is refused before any weights are read.
- One load per model: when two requests ask for the same model at once, the second waits
  for the first one's load instead of starting its own.
- Unload really frees memory (weights moved off the accelerator, references dropped, gc,
  the CUDA cache emptied).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


class ModelBusyError(ModelError):
    """The model is in use by a running analysis and cannot be unloaded right now."""


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
        self._in_use: Counter[str] = Counter()
        self.load_count: Counter[str] = Counter()  # how many real loads happened, per name

    # -- queries -----------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self.settings.memory_budget_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(h.size_bytes for h in self._handles.values())

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
        used = sum(h.size_bytes for n, h in self._handles.items() if n != keep)
        for name in list(self._handles):
            if used + needed <= self.budget_bytes:
                return
            if name == keep or self._in_use.get(name):
                continue
            handle = self._handles.pop(name)
            used -= handle.size_bytes
            logger.info("Evicting model {} to stay within the memory budget", name)
            handle.release()
        if used + needed > self.budget_bytes:
            raise ModelTooLargeError(
                keep,
                needed,
                max(self.budget_bytes - used, 0),
                "memory left in the budget while other models are in use",
            )

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
            if self._in_use.get(key):
                raise ModelBusyError(f"Model {key!r} is in use by a running analysis; try again.")
            handle = self._handles.pop(key, None)
        if handle is None:
            return False
        logger.info("Unloading model {}", key)
        handle.release()
        return True

    def unload_all(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle.release()
