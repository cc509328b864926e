"""The Python API's model entry point: ``tzoo.load_model``."""

from __future__ import annotations

import threading

from tzoo.config import get_settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def default_manager() -> ModelManager:
    """The process-wide manager used by the Python API (the server builds its own)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ModelManager(get_settings())
        return _manager


def load_model(name: str, device: str | None = None, dtype: str | None = None) -> ModelHandle:
    """Load ``name`` (catalogue name, local directory or hub id) and return its handle.

    >>> handle = load_model("tiny-gpt2")
    >>> handle.architecture, handle.n_layers
    ('decoder', 2)
    """
    return default_manager().get(name, device=device, dtype=dtype)
