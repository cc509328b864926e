"""ModelHandle: a loaded model with the facts every analysis asks about."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from tzoo.runtime.architecture import (
    Architecture,
    architecture_of,
    d_model_of,
    n_heads_of,
    n_kv_heads_of,
    n_layers_of,
)
from tzoo.runtime.devices import dtype_name, free_accelerator_memory
from tzoo.runtime.errors import ModelError


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers, counting shared (tied) tensors once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass(eq=False)
class ModelHandle:
    """A loaded model and tokenizer. ``model`` and ``tokenizer`` are gone after unload."""

    name: str
    _model: PreTrainedModel | None = field(repr=False)
    _tokenizer: Any = field(repr=False)
    device: str
    dtype: torch.dtype
    source: str
    architecture: Architecture = field(init=False)
    family: str = field(init=False)
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)
    n_kv_heads: int = field(init=False)
    d_model: int = field(init=False)
    vocab_size: int = field(init=False)
    size_bytes: int = field(init=False)
    # Held while an analysis has hooks installed on the model: hooks see every forward
    # pass on the module, so two analyses on one model must not overlap.
    lock: threading.RLock = field(init=False, repr=False, default_factory=threading.RLock)

    def __post_init__(self) -> None:
        assert self._model is not None
        config = self._model.config
        self.architecture = architecture_of(config)
        self.family = config.model_type
        self.n_layers = n_layers_of(config)
        self.n_heads = n_heads_of(config)
        self.n_kv_heads = n_kv_heads_of(config)
        self.d_model = d_model_of(config)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        self.size_bytes = model_bytes(self._model)

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            raise ModelError(f"Model {self.name!r} was unloaded; load it again.")
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise ModelError(f"Model {self.name!r} was unloaded; load it again.")
        return self._tokenizer

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def release(self) -> None:
        """Free the weights: move off the accelerator, drop references, collect."""
        model, self._model, self._tokenizer = self._model, None, None
        if model is None:
            return
        if self.device != "cpu":
            torch.nn.Module.to(model, "cpu")
        del model
        free_accelerator_memory()

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "family": self.family,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "size_bytes": self.size_bytes,
            "source": self.source,
        }
