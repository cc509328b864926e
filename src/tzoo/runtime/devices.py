"""Device and dtype choice: cuda, then Apple's mps, then cpu, unless told otherwise."""

from __future__ import annotations

import gc

import torch

from tzoo.runtime.errors import DeviceError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def detect_device() -> str:
    """The best device present on this machine."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(requested: str | None) -> str:
    """Turn a setting (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``) into a device string,
    refusing one the machine does not have."""
    if requested in (None, "", "auto"):
        return detect_device()
    assert requested is not None
    kind = requested.split(":", 1)[0]
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"Device {requested!r} was requested but CUDA is not available.")
        return requested
    if kind == "mps":
        if detect_device() != "mps":
            raise DeviceError("Device 'mps' was requested but Apple MPS is not available.")
        return "mps"
    raise DeviceError(f"Unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps.")


def resolve_dtype(requested: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU by default (half precision is slow there); bfloat16 or float16 on GPUs."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "", "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.float32
    assert requested is not None
    try:
        return _DTYPES[requested]
    except KeyError:
        raise DeviceError(f"Unknown dtype {requested!r}; use auto, {', '.join(_DTYPES)}.") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def free_accelerator_memory() -> None:
    """Collect garbage and hand cached blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and detect_device() == "mps":
        mps.empty_cache()
