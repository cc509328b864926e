"""The tuned lens on the tiny models: identity at initialisation, saving and loading,
refusing a lens for another model, training that lowers held-out KL, checkpoints; and the
corpus it trains on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from tzoo_testing import make_settings

import tzoo
from tzoo.analyses import corpus as corpus_module
from tzoo.analyses.corpus import SEED_PROMPTS, build_corpus, shipped_corpus, split_corpus
from tzoo.analyses.lens import logit_lens, tuned_lens
from tzoo.analyses.tuned_lens import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LensMismatchError,
    LensNotFoundError,
    TunedLens,
    default_lens_dir,
    evaluate_kl,
    token_windows,
    train_tuned_lens,
)
from tzoo.cli import app
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

TEXT = "The cat sat on the mat. The cat"
ARRAYS = ("top_ids", "top_probs", "kl_to_final", "entropy", "final_token_rank")


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("tuned-lens")))


@pytest.fixture(scope="module")
def llama(manager: ModelManager) -> ModelHandle:
    return manager.get("tiny-llama")


@pytest.fixture(scope="module")
def corpus(llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """16 documents of 48 sampled tokens (tiny-llama's random weights write random bytes)."""
    folder = tmp_path_factory.mktemp("corpus")
    return build_corpus(llama, n_docs=16, tokens_per_doc=48, seed=0, cache_dir=folder)


def random_lens(handle: ModelHandle, seed: int = 0) -> TunedLens:
    lens = TunedLens.for_model(handle)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return lens


# -- the lens -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_zero_initialised_lens_is_the_logit_lens(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    lens = TunedLens.for_model(handle)
    assert all(torch.count_nonzero(p) == 0 for p in lens.parameters())
    logit, tuned = logit_lens(handle, TEXT), tuned_lens(handle, TEXT, lens=lens)
    assert (logit.lens, tuned.lens) == ("logit", "tuned")
    for name_ in ARRAYS:
        np.testing.assert_array_equal(getattr(tuned, name_), getattr(logit, name_))


def test_translators_are_affine_and_the_last_layer_is_the_identity(llama: ModelHandle) -> None:
    lens = random_lens(llama)
    h = torch.randn(3, 5, llama.d_model)
    translator: Any = lens.translators[1]
    a, b = translator.weight, translator.bias
    torch.testing.assert_close(lens(h, 1), h + h @ a.T + b)
    assert torch.equal(lens(h, lens.n_layers), h)
    with pytest.raises(IndexError):
        lens(h, lens.n_layers + 1)


def test_save_and_load_round_trip(llama: ModelHandle, tmp_path: Path) -> None:
    lens = random_lens(llama)
    lens.training_stats = {"steps": 3, "final_loss": 0.5}
    lens.save(tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / CONFIG_FILE).read_text())
    assert config["format"] == "tzoo-tuned-lens" and config["version"] == 1
    assert (config["model_name"], config["d_model"], config["n_layers"]) == ("tiny-llama", 64, 2)
    loaded = TunedLens.load(tmp_path / "lens")
    assert loaded.training_stats == {"steps": 3, "final_loss": 0.5}
    for (name, a), (_, b) in zip(
        lens.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    from_dir = tuned_lens(llama, TEXT, lens=tmp_path / "lens")
    from_object = tuned_lens(llama, TEXT, lens=lens)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(from_dir, name), getattr(from_object, name))
    assert not np.array_equal(from_dir.kl_to_final, logit_lens(llama, TEXT).kl_to_final)


def test_the_default_lens_lives_in_tuned_lens_dir(
    llama: ModelHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tzoo.config import get_settings

    with pytest.raises(LensNotFoundError, match="tzoo lens train"):
        tuned_lens(llama, TEXT)
    assert default_lens_dir("tiny-llama") == get_settings().cache_dir / "lenses" / "tiny-llama"
    monkeypatch.setenv("TZOO_TUNED_LENS_DIR", str(tmp_path / "lenses"))
    get_settings.cache_clear()
    assert default_lens_dir("org/model") == tmp_path / "lenses" / "org_model"
    random_lens(llama).save(default_lens_dir("tiny-llama"))
    assert tuned_lens(llama, TEXT).lens == "tuned"


def test_a_lens_for_another_model_is_refused(
    manager: ModelManager, llama: ModelHandle, tmp_path: Path
) -> None:
    gpt2 = manager.get("tiny-gpt2")
    with pytest.raises(LensMismatchError, match="trained for tiny-gpt2"):
        tuned_lens(llama, TEXT, lens=TunedLens.for_model(gpt2))
    with pytest.raises(LensMismatchError):
        evaluate_kl(llama, TunedLens.for_model(gpt2), [TEXT])
    # Right name, wrong shapes on disk.
    TunedLens("tiny-llama", 32, 2).save(tmp_path / "narrow")
    config = json.loads((tmp_path / "narrow" / CONFIG_FILE).read_text())
    (tmp_path / "narrow" / CONFIG_FILE).write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(LensMismatchError, match="do not fit"):
        TunedLens.load(tmp_path / "narrow")
    (tmp_path / "narrow" / CONFIG_FILE).write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        TunedLens.load(tmp_path / "narrow")


# -- training -------------------------------------------------------------------------------


def test_training_lowers_heldout_kl_at_every_layer(llama: ModelHandle, corpus: list[str]) -> None:
    train, heldout = split_corpus(corpus, 0.25, seed=0)
    losses: list[float] = []
    lens = train_tuned_lens(
        llama,
        train,
        steps=20,
        lr=3e-3,
        seq_len=32,
        batch_size=4,
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert len(losses) == 20 and losses[-1] < losses[0]
    logit = evaluate_kl(llama, None, heldout, seq_len=32)
    tuned = evaluate_kl(llama, lens, heldout, seq_len=32)
    assert logit.shape == tuned.shape == (llama.n_layers + 1,)
    assert logit[-1] == tuned[-1] == 0
    assert np.all(tuned[:-1] < logit[:-1]), (logit, tuned)
    assert lens.training_stats["steps"] == 20
    # The model itself is untouched: no gradients collected on the shared weights.
    assert all(p.grad is None for p in llama.model.parameters())


def test_resume_continues_from_the_checkpoint(
    llama: ModelHandle, corpus: list[str], tmp_path: Path
) -> None:
    options = {"steps": 10, "lr": 3e-3, "seq_len": 32, "batch_size": 3, "seed": 1}
    whole = train_tuned_lens(llama, corpus, **options)

    def interrupt(step: int, total: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(
            llama,
            corpus,
            **options,
            progress=interrupt,
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
        )
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 5
    steps_run: list[int] = []
    resumed = train_tuned_lens(
        llama,
        corpus,
        **options,
        progress=lambda step, total, loss: steps_run.append(step),
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert steps_run == [6, 7, 8, 9, 10]
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 10


def test_token_windows(llama: ModelHandle) -> None:
    windows = token_windows(llama.tokenizer, ["abcdef", "ghij"], seq_len=4)
    # "<s>abcdef</s>" + "<s>ghij</s>" = 14 tokens: three whole windows of 4.
    assert windows.shape == (3, 4)
    assert token_windows(llama.tokenizer, ["ab"], seq_len=64).shape == (1, 4)
    with pytest.raises(ValueError):
        token_windows(llama.tokenizer, [], seq_len=8)


# -- corpus ---------------------------------------------------------------------------------


def test_the_corpus_is_sampled_once_and_cached(
    llama: ModelHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = build_corpus(llama, n_docs=5, tokens_per_doc=8, seed=3, cache_dir=tmp_path)
    assert len(docs) == 5
    assert [doc.startswith(p) for doc, p in zip(docs, SEED_PROMPTS, strict=False)] == [True] * 5
    stored = json.loads((tmp_path / "tiny-llama-seed3-5x8.json").read_text())
    assert stored["documents"] == docs and stored["prompts"] == list(SEED_PROMPTS)

    def refuse(*args: object) -> list[str]:
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(corpus_module, "_sample", refuse)
    assert build_corpus(llama, n_docs=5, tokens_per_doc=8, seed=3, cache_dir=tmp_path) == docs
    monkeypatch.undo()
    again = build_corpus(llama, n_docs=5, tokens_per_doc=8, seed=3, cache_dir=tmp_path / "new")
    assert again == docs  # the same seed samples the same text
    other = build_corpus(llama, n_docs=5, tokens_per_doc=8, seed=4, cache_dir=tmp_path)
    assert other != docs


def test_split_and_shipped_corpus() -> None:
    shipped = shipped_corpus()
    assert len(shipped) >= 20 and all(len(p.split()) > 40 for p in shipped)
    train, heldout = split_corpus(shipped, 0.1, seed=0)
    assert len(heldout) == 2 and len(train) == len(shipped) - 2
    assert sorted(train + heldout) == sorted(shipped)
    assert split_corpus(shipped, 0.1, seed=0) == (train, heldout)
    assert split_corpus(shipped, 0.1, seed=1) != (train, heldout)
    with pytest.raises(ValueError):
        split_corpus(["only one"])


# -- API and CLI ----------------------------------------------------------------------------


def test_the_python_api_exports_the_lenses() -> None:
    assert tzoo.tuned_lens is tuned_lens and tzoo.logit_lens is logit_lens
    assert tzoo.TunedLens is TunedLens


def test_lens_train_command(tmp_path: Path) -> None:
    out = tmp_path / "lens"
    args = ["lens", "train", "--model", "tiny-llama", "--steps", "20", "--lr", "3e-3"]
    args += ["--docs", "16", "--tokens-per-doc", "48", "--seq-len", "32", "--batch-size", "4"]
    args += ["--heldout", "0.25", "--no-shipped", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Held-out KL" in result.output and "Saved the tuned lens" in result.output
    lens = TunedLens.load(out)
    rows = lens.training_stats["heldout"]
    assert [row["layer"] for row in rows] == [0, 1] and all(row["improved"] for row in rows)
    assert (out / "checkpoints" / CHECKPOINT_FILE).is_file()


def test_lens_train_refuses_an_encoder() -> None:
    result = CliRunner().invoke(app, ["lens", "train", "--model", "tiny-bert", "--steps", "1"])
    assert result.exit_code == 1
    assert "needs a decoder with an unembedding" in result.output
