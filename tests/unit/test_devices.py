"""Device and dtype choice."""

from __future__ import annotations

import pytest
import torch

from tzoo.runtime.devices import detect_device, resolve_device, resolve_dtype
from tzoo.runtime.errors import DeviceError


def test_auto_picks_the_best_present_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else detect_device()
    assert resolve_device("auto") == resolve_device(None) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_missing_accelerator_is_an_error() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unknown_device_and_dtype_names_are_errors() -> None:
    with pytest.raises(DeviceError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="Unknown dtype 'float8'"):
        resolve_dtype("float8", "cpu")


def test_dtype_defaults_to_float32_on_cpu_and_honours_requests() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
