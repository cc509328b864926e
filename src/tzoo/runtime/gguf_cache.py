"""Convert a GGUF file once into a normal safetensors model directory, then reuse it.

transformers de-quantises GGUF on every load (~20 s for SmolLM2-135M); reading the
converted safetensors takes well under a second. The cache directory is an ordinary model
directory (config with ``architectures``, ``model.safetensors``, tokenizer files), so other
tools can open it with ``from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file

from tzoo.runtime.errors import ModelLoadError

CACHE_FORMAT_VERSION = 1
MANIFEST = "tzoo-cache.json"

ProgressFn = Callable[[str], None]


def cache_dir_for(cache_root: Path, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_root / "models" / safe


def _source_fingerprint(gguf_path: Path) -> dict[str, object]:
    stat = gguf_path.stat()
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "source": str(gguf_path.resolve()),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
    }


def is_cached(target: Path, gguf_path: Path) -> bool:
    """True when ``target`` holds a finished conversion of this exact GGUF file."""
    manifest = target / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = _source_fingerprint(gguf_path)
    return all(recorded.get(k) == v for k, v in expected.items())


def ensure_converted(gguf_path: Path, target: Path, *, progress: ProgressFn | None = None) -> Path:
    """Return ``target``, converting ``gguf_path`` into it first if needed.

    A file lock makes concurrent processes convert once; the conversion is written into a
    temporary sibling and renamed, so a crash never leaves a half-written cache behind.
    """
    if is_cached(target, gguf_path):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_cached(target, gguf_path):  # another process finished while we waited
            return target
        tmp = target.with_name(target.name + f".tmp-{time.time_ns()}")
        try:
            _convert(gguf_path, tmp, progress)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path, progress: ProgressFn | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda _msg: None)
    say(f"Reading {gguf_path.name} (de-quantising; this happens once)")
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"Cannot read GGUF file {gguf_path}: {exc}") from exc
    say("Writing safetensors cache")
    out.mkdir(parents=True)
    state = model.state_dict()
    # save_pretrained refuses a GGUF-loaded model (its quantization config), so the state
    # dict is written directly; a tied lm_head shares storage with the embedding and is
    # re-tied on load.
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = _source_fingerprint(gguf_path)
    manifest["converted_seconds"] = round(time.perf_counter() - started, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    del model, state
