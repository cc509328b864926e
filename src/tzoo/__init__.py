"""Transformer Zoo: look inside transformer language models.

The library is the product; the web app, CLI and desktop app call it. Heavy modules
(torch, transformers) are imported lazily so that ``tzoo --help`` starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it; resolved on first access.
_LAZY = {
    "load_model": "tzoo.api",
    "attention": "tzoo.analyses.attention",
    "verbalize": "tzoo.analyses.verbalize",
    "VerbalizeResult": "tzoo.analyses.verbalize",
    "AttentionResult": "tzoo.analyses.attention",
    "logit_lens": "tzoo.analyses.lens",
    "tuned_lens": "tzoo.analyses.lens",
    "LensResult": "tzoo.analyses.lens",
    "TunedLens": "tzoo.analyses.tuned_lens",
    "ModelManager": "tzoo.runtime.manager",
    "ModelHandle": "tzoo.runtime.handle",
    "Settings": "tzoo.config",
    "create_app": "tzoo.web.app",
    "TranscoderSet": "tzoo.circuits.transcoders",
    "TranscoderConfig": "tzoo.circuits.transcoders",
    "train_transcoders": "tzoo.circuits.training",
    "load_transcoders": "tzoo.circuits.io",
    "save_transcoders": "tzoo.circuits.io",
    "attribute": "tzoo.circuits.attribution",
    "prune": "tzoo.circuits.attribution",
    "active_features": "tzoo.circuits.features",
    "build_dashboards": "tzoo.circuits.features",
    "explain_circuit": "tzoo.circuits.agent",
    "validate": "tzoo.validation.runner",
    "ValidationReport": "tzoo.validation.report",
}

if TYPE_CHECKING:
    from tzoo.analyses.attention import AttentionResult, attention
    from tzoo.analyses.lens import LensResult, logit_lens, tuned_lens
    from tzoo.analyses.tuned_lens import TunedLens
    from tzoo.analyses.verbalize import VerbalizeResult, verbalize
    from tzoo.api import load_model
    from tzoo.circuits.agent import explain_circuit
    from tzoo.circuits.attribution import attribute, prune
    from tzoo.circuits.features import active_features, build_dashboards
    from tzoo.circuits.io import load_transcoders, save_transcoders
    from tzoo.circuits.training import train_transcoders
    from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
    from tzoo.config import Settings
    from tzoo.runtime.handle import ModelHandle
    from tzoo.runtime.manager import ModelManager
    from tzoo.validation.report import ValidationReport
    from tzoo.validation.runner import validate
    from tzoo.web.app import create_app

__all__ = [
    "AttentionResult",
    "LensResult",
    "ModelHandle",
    "ModelManager",
    "Settings",
    "TranscoderConfig",
    "TranscoderSet",
    "TunedLens",
    "ValidationReport",
    "VerbalizeResult",
    "__version__",
    "active_features",
    "attention",
    "attribute",
    "build_dashboards",
    "create_app",
    "explain_circuit",
    "load_model",
    "load_transcoders",
    "logit_lens",
    "prune",
    "save_transcoders",
    "train_transcoders",
    "tuned_lens",
    "validate",
    "verbalize",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tzoo' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
