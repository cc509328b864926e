"""Training transcoders on the tiny models: activations streamed from the MLPs, the loss and
its schedules, JumpReLU thresholds that learn, dead features, training that explains the
MLPs, exact resumption from a checkpoint, and the evaluation against direct computations."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses.corpus import build_corpus, split_corpus
from tzoo.analyses.tuned_lens import token_windows
from tzoo.circuits.activations import collect_mlp_pairs, mean_norms, stream_mlp_pairs
from tzoo.circuits.training import (
    CHECKPOINT_FILE,
    DeadFeatureTracker,
    StepStats,
    TrainingError,
    evaluate_transcoders,
    learning_rate_at,
    sparsity_lambda_at,
    train_transcoders,
    transcoder_loss,
)
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import PatchFn, patch, run_with_cache
from tzoo.runtime.manager import ModelManager

SEQ_LEN = 32
FAST: dict[str, Any] = {"batch_tokens": 256, "seq_len": SEQ_LEN, "lr": 3e-3, "sparsity": 0.5}


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("transcoders")))


@pytest.fixture(scope="module")
def llama(manager: ModelManager) -> ModelHandle:
    return manager.get("tiny-llama")


@pytest.fixture(scope="module")
def gpt2(manager: ModelManager) -> ModelHandle:
    return manager.get("tiny-gpt2")


@pytest.fixture(scope="module")
def corpora(
    llama: ModelHandle, gpt2: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[list[str], list[str]]]:
    """(train, held-out) per model: 16 documents of 48 sampled tokens each."""
    folder = tmp_path_factory.mktemp("corpus")
    return {
        h.name: split_corpus(build_corpus(h, n_docs=16, tokens_per_doc=48, cache_dir=folder), 0.25)
        for h in (llama, gpt2)
    }


def config_for(handle: ModelHandle, **overrides: object) -> TranscoderConfig:
    values: dict[str, object] = {
        "model_name": handle.name,
        "kind": "plt",
        "d_model": handle.d_model,
        "n_features": 128,
        "layers": (0, 1),
        "n_model_layers": handle.n_layers,
    }
    values.update(overrides)
    return TranscoderConfig(**values)  # type: ignore[arg-type]


def windows_of(handle: ModelHandle, texts: list[str]) -> torch.Tensor:
    return token_windows(handle.tokenizer, texts, SEQ_LEN)


# -- activations ------------------------------------------------------------------------------


def test_mlp_pairs_are_the_hooked_values_without_position_zero(
    llama: ModelHandle, corpora: dict
) -> None:
    ids = windows_of(llama, corpora["tiny-llama"][0])[:3]
    batch = collect_mlp_pairs(llama, ids, [1])
    _, cache = run_with_cache(
        llama, {"input_ids": ids}, sites=["mlp_in", "mlp_out"], attentions=False
    )
    for name, got in (("mlp_in", batch.inputs[1]), ("mlp_out", batch.outputs[1])):
        expected = cache[f"decoder.1.{name}"][:, 1:].reshape(-1, llama.d_model)
        torch.testing.assert_close(got, expected)
    assert batch.n_tokens == 3 * (SEQ_LEN - 1)


def test_streamed_norms_are_the_mean_norms(llama: ModelHandle, corpora: dict) -> None:
    windows = windows_of(llama, corpora["tiny-llama"][0])[:6]
    stream = list(stream_mlp_pairs(llama, windows, [0, 1], windows_per_batch=4))
    assert [b.n_tokens for b in stream] == [4 * (SEQ_LEN - 1), 2 * (SEQ_LEN - 1)]
    norms_in, norms_out = mean_norms(stream)
    everything = collect_mlp_pairs(llama, windows, [0, 1])
    for layer in (0, 1):
        assert norms_in[layer] == pytest.approx(float(everything.inputs[layer].norm(dim=-1).mean()))
        assert norms_out[layer] == pytest.approx(
            float(everything.outputs[layer].norm(dim=-1).mean())
        )


# -- schedules, thresholds, dead features -----------------------------------------------------


def test_lambda_warms_up_linearly_over_the_whole_run() -> None:
    values = [sparsity_lambda_at(step, 10, 2.0) for step in range(10)]
    assert values == pytest.approx([0.2 * (k + 1) for k in range(10)])


def test_the_learning_rate_is_constant_then_decays_over_the_last_fifth() -> None:
    rates = [learning_rate_at(step, 100, 1e-3) for step in range(100)]
    assert rates[:81] == [1e-3] * 81
    assert rates[90] == pytest.approx(5e-4) and rates[99] == pytest.approx(5e-5)
    assert all(a > b for a, b in itertools.pairwise(rates[80:]))


def test_the_jumprelu_threshold_learns_and_dead_features_are_pushed_up(
    llama: ModelHandle, corpora: dict
) -> None:
    transcoders = TranscoderSet(config_for(llama, layers=(1,)), seed=0)
    batch = collect_mlp_pairs(llama, windows_of(llama, corpora["tiny-llama"][0])[:4], [1])
    transcoders.set_scales(*mean_norms([batch]))
    with torch.no_grad():
        transcoders.b_enc[0][:10] = -100.0  # features 0-9 can never fire
    # Through the straight-through estimator alone: live features' thresholds move.
    parts = transcoder_loss(transcoders, batch, sparsity_lambda=1.0, pre_act_coefficient=0.0)
    parts.total.backward()
    threshold_grad = transcoders.threshold[0].grad
    assert threshold_grad is not None and (threshold_grad[10:] != 0).sum() > 10
    assert torch.all(threshold_grad[:10] == 0)
    # The pre-activation penalty is a dead feature's only gradient: it raises its bias
    # and lowers its threshold.
    transcoders.zero_grad()
    transcoder_loss(
        transcoders, batch, sparsity_lambda=1.0, pre_act_coefficient=1e-3
    ).total.backward()
    bias_grad, threshold_grad = transcoders.b_enc[0].grad, transcoders.threshold[0].grad
    assert bias_grad is not None and torch.all(bias_grad[:10] < 0)
    assert threshold_grad is not None and torch.all(threshold_grad[:10] > 0)

    tracker = DeadFeatureTracker([1], 128, dead_after_tokens=2 * batch.n_tokens)
    tracker.update(parts.acts)
    assert not tracker.dead(1).any()  # not silent for long enough yet
    tracker.update(parts.acts)
    dead = tracker.dead(1)
    never_fired = ~(parts.acts[1] > 0).any(dim=0)
    assert torch.equal(dead, never_fired) and dead[:10].all()
    assert tracker.dead_fraction(1) == pytest.approx(float(never_fired.float().mean()))


def test_topk_trains_on_the_reconstruction_alone(llama: ModelHandle, corpora: dict) -> None:
    transcoders = TranscoderSet(config_for(llama, activation="topk", top_k=8), seed=0)
    batch = collect_mlp_pairs(llama, windows_of(llama, corpora["tiny-llama"][0])[:2], [0, 1])
    parts = transcoder_loss(transcoders, batch, sparsity_lambda=100.0, pre_act_coefficient=1.0)
    assert float(parts.total.detach()) == pytest.approx(parts.mse)
    assert parts.l0 == {0: 8.0, 1: 8.0}


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kind", "activation"),
    [
        ("tiny-llama", "plt", "jumprelu"),
        ("tiny-llama", "clt", "topk"),
        ("tiny-gpt2", "skip", "jumprelu"),
    ],
)
def test_training_explains_the_mlps(
    manager: ModelManager, corpora: dict, model: str, kind: str, activation: str
) -> None:
    handle = manager.get(model)
    train, heldout = corpora[model]
    config = config_for(handle, kind=kind, activation=activation, top_k=16)
    steps: list[StepStats] = []
    transcoders = train_transcoders(
        handle, config, train, tokens=8000, progress=steps.append, **FAST
    )
    assert [s.step for s in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 30
    first, last = steps[0].mse, sum(s.mse for s in steps[-5:]) / 5
    assert last < 0.5 * first
    evaluation = evaluate_transcoders(handle, transcoders, heldout, seq_len=SEQ_LEN)
    for row in evaluation.layers:
        assert row.explained_variance > 0.25, evaluation
        assert 0 < row.l0 < 128
    assert transcoders.config.training["tokens_seen"] >= 8000
    assert transcoders.config.training["steps"] == len(steps)


def test_a_resumed_run_ends_with_the_same_weights(
    llama: ModelHandle, corpora: dict, tmp_path: Path
) -> None:
    train = corpora["tiny-llama"][0]
    config = config_for(llama, kind="skip", n_features=64)
    options: dict[str, Any] = {**FAST, "tokens": 2000, "checkpoint_every": 3}
    whole = train_transcoders(llama, config, train, checkpoint_dir=tmp_path / "a", **options)

    def stop_at_four(stats: StepStats) -> None:
        if stats.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_transcoders(
            llama, config, train, checkpoint_dir=tmp_path / "b", progress=stop_at_four, **options
        )
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    steps: list[StepStats] = []
    resumed = train_transcoders(
        llama,
        config,
        train,
        checkpoint_dir=tmp_path / "b",
        resume=True,
        progress=steps.append,
        **options,
    )
    assert steps[0].step == 4  # steps 1-3 were not taken again
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed.config.training == whole.config.training

    with pytest.raises(TrainingError, match=r"lr: 0\.003 there, 0\.001 now"):
        train_transcoders(
            llama,
            config,
            train,
            checkpoint_dir=tmp_path / "b",
            resume=True,
            **{**options, "lr": 1e-3},
        )


def test_training_refuses_a_config_for_another_model(llama: ModelHandle, corpora: dict) -> None:
    with pytest.raises(TrainingError, match="d_model 32"):
        train_transcoders(llama, config_for(llama, d_model=32), corpora["tiny-llama"][0], tokens=10)


# -- evaluation -------------------------------------------------------------------------------


def test_evaluation_matches_a_direct_computation(llama: ModelHandle, corpora: dict) -> None:
    heldout = corpora["tiny-llama"][1]
    transcoders = TranscoderSet(config_for(llama, kind="clt"), seed=3)
    windows = windows_of(llama, heldout)
    transcoders.set_scales(*mean_norms([collect_mlp_pairs(llama, windows, [0, 1])]))
    evaluation = evaluate_transcoders(llama, transcoders, heldout, seq_len=SEQ_LEN)

    batch = collect_mlp_pairs(llama, windows, [0, 1])
    with torch.no_grad():
        predicted, acts = transcoders(batch.inputs)
    for row in evaluation.layers:
        y = batch.outputs[row.layer].double()
        error = (predicted[row.layer].double() - y).pow(2).sum()
        variance = (y - y.mean(dim=0)).pow(2).sum()
        assert row.explained_variance == pytest.approx(float(1 - error / variance), abs=1e-6)
        assert row.l0 == pytest.approx(float((acts[row.layer] > 0).float().sum(-1).mean()))
    assert evaluation.n_tokens == batch.n_tokens

    # The replacement model, computed here by hand: layer 0's output from the real input,
    # layer 1's from the input the replaced layer 0 leads to; position 0 left real.
    def replaced_logits() -> torch.Tensor:
        seen: dict[int, torch.Tensor] = {}
        feats: dict[int, torch.Tensor] = {}

        def read(layer: int) -> Callable[[torch.Tensor], None]:
            def fn(x: torch.Tensor) -> None:
                seen[layer] = x
                feats[layer] = transcoders.activate(layer, transcoders.encode(layer, x))

            return fn

        def write(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(y: torch.Tensor) -> torch.Tensor:
                out = transcoders.decode(layer, feats, seen[layer])
                return torch.cat([y[:, :1], out[:, 1:]], dim=1)

            return fn

        fns: dict[str, PatchFn] = {f"decoder.{i}.mlp_in": read(i) for i in (0, 1)}
        fns |= {f"decoder.{i}.mlp_out": write(i) for i in (0, 1)}
        with torch.no_grad(), patch(llama, fns):
            return llama.model(input_ids=windows).logits[:, 1:]

    with torch.no_grad():
        real = llama.model(input_ids=windows).logits[:, 1:]
    replaced = replaced_logits()
    log_p, log_q = real.log_softmax(-1), replaced.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    agreement = float((real.argmax(-1) == replaced.argmax(-1)).float().mean())
    assert evaluation.kl == pytest.approx(kl, rel=1e-4, abs=1e-7) and kl > 0
    assert evaluation.next_token_agreement == pytest.approx(agreement)
