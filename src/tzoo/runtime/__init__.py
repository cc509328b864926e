"""Model runtime: catalogue, loaders, convert-once cache, ModelManager, activation hooks."""

from tzoo.runtime.catalogue import ModelSpec, catalogue, register_model, resolve
from tzoo.runtime.errors import (
    DeviceError,
    InvalidModelNameError,
    ModelError,
    ModelLoadError,
    ModelTooLargeError,
    ModelUnavailableError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import ActivationCache, hook_points, patch, register_adapter, run_with_cache
from tzoo.runtime.manager import MemoryBudgetError, ModelBusyError, ModelManager, ModelStatus

__all__ = [
    "ActivationCache",
    "DeviceError",
    "InvalidModelNameError",
    "MemoryBudgetError",
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
    "hook_points",
    "patch",
    "register_adapter",
    "register_model",
    "resolve",
    "run_with_cache",
]
