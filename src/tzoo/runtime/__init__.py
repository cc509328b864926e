"""Model runtime: catalogue, loaders, convert-once cache, ModelManager, activation hooks."""

from tzoo.runtime.catalogue import ModelSpec, catalogue, register_model, resolve
from tzoo.runtime.errors import (
    DeviceError,
    ModelError,
    ModelLoadError,
    ModelTooLargeError,
    ModelUnavailableError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelBusyError, ModelManager, ModelStatus

__all__ = [
    "DeviceError",
    "ModelBusyError",
    "ModelError",
    "ModelHandle",
    "ModelLoadError",
    "ModelManager",
    "ModelSpec",
    "ModelStatus",
    "ModelTooLargeError",
    "ModelUnavailableError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "catalogue",
    "register_model",
    "resolve",
]
