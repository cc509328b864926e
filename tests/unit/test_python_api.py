"""The library front door: ``tzoo.load_model`` and the lazy top-level package."""

from __future__ import annotations

import subprocess
import sys

import torch

import tzoo


def test_load_model_returns_a_described_handle() -> None:
    handle = tzoo.load_model("tiny-t5")
    assert (handle.name, handle.architecture, handle.n_layers, handle.n_heads) == (
        "tiny-t5",
        "encoder-decoder",
        2,
        4,
    )
    assert handle.dtype == torch.float32 and handle.device == "cpu"
    assert tzoo.load_model("tiny-t5") is handle  # served from the manager, not reloaded


def test_importing_tzoo_does_not_import_torch() -> None:
    code = "import sys, tzoo; print('torch' in sys.modules, tzoo.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", tzoo.__version__]
