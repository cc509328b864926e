"""Errors the runtime raises; each carries a sentence a user can act on.

The web layer maps them onto HTTP statuses (see ``tzoo.web.errors``) and the CLI onto exit
codes, so neither needs to know how a model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable


class ModelError(Exception):
    """Base class of every model-runtime error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModelError(ModelError, LookupError):
    """The name is neither in the catalogue, a local model directory, nor a hub id."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(
            f"Unknown model {name!r}. Known models: {', '.join(self.known)}. "
            "A local model directory or a hub id (owner/name) also works."
        )


class ModelTooLargeError(ModelError):
    """The model's weights exceed the memory budget or the per-model size limit."""

    def __init__(self, name: str, size_bytes: int, limit_bytes: int, limit_name: str) -> None:
        self.name = name
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        self.limit_name = limit_name
        super().__init__(
            f"Model {name!r} needs {_mib(size_bytes)} but the {limit_name} is {_mib(limit_bytes)}."
        )


class ModelLoadError(ModelError):
    """The files are there but are not a loadable model (corrupt, truncated, wrong kind)."""


class InvalidModelNameError(ModelLoadError):
    """The name cannot name any model: empty, too long, or with control characters."""


class ModelUnavailableError(ModelError):
    """The model is known but cannot be had here (package not installed, hub unreachable,
    gated repository)."""


class DeviceError(ModelError):
    """A device or dtype was asked for that this machine cannot provide."""


class UnsupportedArchitectureError(ModelError):
    """An analysis needs internals (hooks) of an architecture we have no adapter for."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
