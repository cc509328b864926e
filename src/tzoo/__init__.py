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
}

if TYPE_CHECKING:
    from tzoo.analyses.attention import AttentionResult, attention
    from tzoo.analyses.lens import LensResult, logit_lens, tuned_lens
    from tzoo.analyses.tuned_lens import TunedLens
    from tzoo.analyses.verbalize import VerbalizeResult, verbalize
    from tzoo.api import load_model
    from tzoo.config import Settings
    from tzoo.runtime.handle import ModelHandle
    from tzoo.runtime.manager import ModelManager
    from tzoo.web.app import create_app

__all__ = [
    "AttentionResult",
    "LensResult",
    "ModelHandle",
    "ModelManager",
    "Settings",
    "TunedLens",
    "VerbalizeResult",
    "__version__",
    "attention",
    "create_app",
    "load_model",
    "logit_lens",
    "tuned_lens",
    "verbalize",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tzoo' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
