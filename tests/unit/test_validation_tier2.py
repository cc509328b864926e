"""Tier 2: attention statistics, Integrated Gradients and robustness, against direct
computations (hand-built patterns, Captum called directly) and models built to be
degenerate in one known way."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients
from torch import Tensor, nn
from tzoo_testing import make_settings
from validation_zoo import LeakyMaskLM, tiny_causal_lm

from tzoo.runtime.manager import ModelManager
from tzoo.validation import (
    CheckResult,
    Subject,
    ValidationOptions,
    attention_patterns,
    load_subject,
    subject_from_module,
    validate,
)
from tzoo.validation.tier2 import (
    distance_from_uniform,
    js_distance,
    normalised_entropy,
)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("tier2")))


def check(subject: Subject | nn.Module, name: str, ig_steps: int = 32, **extra: Any) -> CheckResult:
    options = ValidationOptions(ig_steps=ig_steps, extra=extra)
    return validate(subject, tiers=(2,), checks=[name], options=options)[name]


# -- models built for one property --------------------------------------------------------------


class HeadsLM(nn.Module):
    """One attention layer computed with F.scaled_dot_product_attention, each head tuned:
    its queries multiplied by ``scales`` (x1000: near one-hot; 0: exactly uniform), an
    additive ``first_key_bias`` on the first key (a sink), ``copy`` = (a, b) gives head b
    head a's queries and keys (a duplicate), ``nan_head`` poisons one head's scores."""

    VOCAB, D_HEAD = 61, 8

    def __init__(
        self,
        scales: list[float],
        first_key_bias: list[float] | None = None,
        copy: tuple[int, int] | None = None,
        causal: bool = True,
        nan_head: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = len(scales)
        d = self.heads * self.D_HEAD
        self.embed = nn.Embedding(self.VOCAB, d)
        self.positions = nn.Embedding(32, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, self.VOCAB)
        self.register_buffer("scales", torch.tensor(scales))
        self.register_buffer("bias", torch.tensor(first_key_bias or [0.0] * self.heads))
        self.causal, self.nan_head = causal, nan_head
        if copy is not None:
            a, b = copy
            with torch.no_grad():
                for part in (0, 1):  # queries, keys: weights and biases
                    for tensor in (self.qkv.weight, self.qkv.bias):
                        rows = tensor[part * d : (part + 1) * d]
                        rows[b * self.D_HEAD : (b + 1) * self.D_HEAD] = rows[
                            a * self.D_HEAD : (a + 1) * self.D_HEAD
                        ].clone()

    def forward(self, input_ids: Tensor) -> Tensor:
        b, t = input_ids.shape
        x = self.embed(input_ids) + self.positions(torch.arange(t))
        q, k, v = (
            part.view(b, t, self.heads, self.D_HEAD).transpose(1, 2)
            for part in self.qkv(x).chunk(3, -1)
        )
        q = q * self.scales[:, None, None]
        scores = torch.zeros(self.heads, t, t)
        scores[:, :, 0] += self.bias[:, None]
        if self.nan_head is not None:
            scores[self.nan_head] = math.nan
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, -math.inf)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=scores)
        return self.out(h.transpose(1, 2).reshape(b, t, -1))


class BagOfTokens(nn.Module):
    """Embedding and linear: each position's logits depend on its own token only; no
    attention at all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.out(self.embed(input_ids))


class SteppedLM(BagOfTokens):
    """Thresholds its embeddings: no gradient reaches them."""

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.out((self.embed(input_ids) > 0).float())


class FragileLM(BagOfTokens):
    """sin(10^4 x) of its embeddings: 1% of their spread is many periods."""

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.out(torch.sin(self.embed(input_ids) * 1e4))


class HalfAttentionModel(nn.Module):
    """Hugging Face-shaped (a config, can_generate, output_attentions) and returns attention
    rows that sum to 1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=40)
        self.embed = nn.Embedding(40, 8)
        self.out = nn.Linear(8, 40)

    def can_generate(self) -> bool:
        return True

    def forward(
        self, input_ids: Tensor, output_attentions: bool = False, use_cache: bool = False
    ) -> Any:
        b, t = input_ids.shape
        causal = torch.ones(t, t).tril()
        weights = 0.5 * causal / causal.sum(-1, keepdim=True)
        return SimpleNamespace(
            logits=self.out(self.embed(input_ids)),
            attentions=(weights.expand(b, 2, t, t),) if output_attentions else None,
        )


# -- attention statistics ---------------------------------------------------------------------


def test_entropy_equals_a_direct_computation_on_a_hand_built_pattern() -> None:
    # One causal head over three tokens: row 0 attends itself only, row 1 half/half,
    # row 2 (0.7, 0.2, 0.1).
    p = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.7, 0.2, 0.1]], dtype=torch.float64)
    p = p[None, None]
    entropy = normalised_entropy(p, causal=True)[0, 0]
    assert math.isnan(entropy[0])  # one key: no choice to measure
    assert entropy[1] == pytest.approx(1.0)  # uniform over its two keys
    direct = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert entropy[2] == pytest.approx(direct, abs=1e-12)
    # Read as bidirectional, every row may attend three keys.
    both = normalised_entropy(p, causal=False)[0, 0]
    assert both[0] == pytest.approx(0.0) and both[1] == pytest.approx(math.log(2) / math.log(3))

    tv = distance_from_uniform(p, causal=True)[0, 0]
    assert tv[1] == pytest.approx(0.0)
    assert tv[2] == pytest.approx(0.5 * (abs(0.7 - 1 / 3) + abs(0.2 - 1 / 3) + abs(0.1 - 1 / 3)))

    one_hot = torch.tensor([1.0, 0.0])
    assert float(js_distance(one_hot, torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)
    assert float(js_distance(one_hot, one_hot)) == pytest.approx(0.0)


def direct_statistics(weights: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-head (entropy, sink) of a causal (B, H, T, T) pattern, written out in loops."""
    w = weights.double().numpy()
    b, h, t, _ = w.shape
    entropy, sink = np.zeros(h), np.zeros(h)
    for head in range(h):
        rows = []
        for i in range(b):
            for q in range(1, t):  # rows with at least two keys to choose from
                p = w[i, head, q, : q + 1]
                p = p[p > 0]
                rows.append(-(p * np.log(p)).sum() / math.log(q + 1))
        entropy[head] = np.mean(rows)
        sink[head] = w[:, head, 1:, 0].mean()
    return entropy, sink


def test_attention_stats_on_tiny_causal_lm_equal_direct_computation() -> None:
    subject = subject_from_module(tiny_causal_lm())
    result = check(subject, "attention_stats")
    assert result.status == "pass", result.message
    ids = torch.tensor(result.details["input_ids"])
    captured = attention_patterns(subject, ids)
    heads = result.details["heads"]
    assert len(heads) == 2 * 4
    for layer, weights in enumerate(captured.weights):
        entropy, sink = direct_statistics(weights)
        mine = [h for h in heads if h["layer"] == layer]
        np.testing.assert_allclose([h["entropy"] for h in mine], entropy, rtol=1e-9)
        np.testing.assert_allclose([h["sink"] for h in mine], sink, rtol=1e-9)
    assert result.details["counts"] == {
        "collapsed": 0,
        "uniform": 0,
        "duplicate": 0,
        "sink": 0,
        "impossible": 0,
    }
    assert result.value == 0.0 and result.threshold == 0.5


def test_collapsed_uniform_sink_and_duplicate_heads_are_flagged() -> None:
    # Heads: x1000 (collapsed), x0 (uniform), a sink, normal, a copy of head 3, normal.
    model = HeadsLM([1000.0, 0.0, 1.0, 1.0, 1.0, 0.7], [0, 0, 4.0, 0, 0, 0], copy=(3, 4))
    result = check(model.eval(), "attention_stats")
    heads = result.details["heads"]
    flags = [h["flags"] for h in heads]
    assert flags[0] == ["collapsed"]
    assert heads[0]["entropy"] < 0.01
    assert flags[1] == ["uniform"]
    assert heads[1]["entropy"] == pytest.approx(1.0)
    assert heads[1]["distance_from_uniform"] == pytest.approx(0.0, abs=1e-6)  # float32
    assert flags[2] == ["sink"]
    assert heads[2]["sink"] > 0.6
    assert flags[3] == [] and flags[5] == []
    assert flags[4] == ["duplicate"] and heads[4]["duplicate_of"] == 3
    assert heads[4]["nearest_head_js"] == pytest.approx(0.0, abs=1e-6)
    # 3 of 6 heads degenerate: at the 50% bar, a warning, naming each kind.
    assert result.status == "warn"
    assert result.value == pytest.approx(0.5)
    assert "1 collapsed" in result.message and "1 near-uniform" in result.message
    # The sink share equals the pattern's own attention on the first token.
    _, sink = direct_statistics(
        attention_patterns(
            subject_from_module(model), torch.tensor(result.details["input_ids"])
        ).weights[0]
    )
    assert heads[2]["sink"] == pytest.approx(sink[2], rel=1e-9)
    # The share that warns is a knob: at 60%, the same heads pass.
    assert check(model, "attention_stats", degenerate_warn_share=0.6).status == "pass"


def test_every_head_collapsed_warns() -> None:
    result = check(HeadsLM([1000.0] * 4).eval(), "attention_stats")
    assert result.status == "warn"
    assert result.details["counts"]["collapsed"] == 4
    assert result.value == 1.0


def test_future_attention_in_a_decoder_fails_and_an_encoder_passes() -> None:
    model = HeadsLM([1.0, 1.0], causal=False).eval()
    result = check(model, "attention_stats")  # a plain module is taken as a decoder
    assert result.status == "fail"
    assert "future tokens" in result.message and '"causal": false' in result.message
    assert all("impossible" in h["flags"] for h in result.details["heads"])
    encoder = subject_from_module(model, {"causal": False})
    assert check(encoder, "attention_stats").status == "pass"


def test_the_zoos_leaky_mask_is_caught_as_future_attention() -> None:
    torch.manual_seed(0)
    result = check(LeakyMaskLM().eval(), "attention_stats")
    assert result.status == "fail"
    assert "on future tokens" in result.message
    assert result.details["counts"]["impossible"] == 8  # every head of both layers


def test_nan_attention_fails() -> None:
    result = check(HeadsLM([1.0, 1.0], nan_head=1).eval(), "attention_stats")
    assert result.status == "fail"
    assert "head 1: NaN/Inf weights" in result.message
    assert result.details["heads"][0]["flags"] == []


def test_non_finite_logits_skip_attribution_and_robustness() -> None:
    """NaN logits are the nan_inf check's to fail; a NaN delta must not read as a pass."""
    model = HeadsLM([1.0, 1.0], nan_head=1).eval()
    for name in ("integrated_gradients", "robustness"):
        result = check(model, name)
        assert result.status == "skip"
        assert "not finite" in result.message and "nan_inf" in result.message


def test_rows_not_summing_to_one_fail() -> None:
    result = check(HalfAttentionModel().eval(), "attention_stats")
    assert result.status == "fail"
    assert "rows sum to 1 ± 0.5" in result.message


def test_no_attention_skips_with_the_reason() -> None:
    result = check(BagOfTokens().eval(), "attention_stats")
    assert result.status == "skip"
    assert "No attention weights could be captured" in result.message


def test_untrained_hf_model_warns_of_uniform_heads(manager: ModelManager) -> None:
    # tiny-gpt2's random weights (std 0.02) give near-uniform attention everywhere.
    result = check(load_subject("tiny-gpt2", manager=manager), "attention_stats")
    assert result.status == "warn"
    assert result.details["counts"]["uniform"] == 8
    assert result.details["counts"]["duplicate"] == 0  # uniform pairs are not also duplicates
    assert "untrained" in result.message


# -- integrated gradients -------------------------------------------------------------------------


def direct_captum(
    model: nn.Module, embedding: nn.Module, details: dict[str, Any], pad: int
) -> Tensor:
    """Captum on the model itself, no code of ours: the per-token attributions."""
    position, target = details["position"], details["target_token"]

    def forward(ids: Tensor) -> Tensor:
        output = model(input_ids=ids) if hasattr(model, "config") else model(ids)
        logits = output if isinstance(output, Tensor) else output[0]  # logits / hidden state
        return logits[:, position, target]

    ids = torch.tensor([details["input_ids"]])
    attributions = LayerIntegratedGradients(forward, embedding).attribute(
        ids, baselines=torch.full_like(ids, pad), n_steps=details["steps"]
    )
    return attributions.sum(-1)[0]


@pytest.mark.parametrize("name", ["TinyCausalLM", "tiny-gpt2", "tiny-bert"])
def test_integrated_gradients_are_complete_and_equal_captum(
    manager: ModelManager, name: str
) -> None:
    if name == "TinyCausalLM":
        subject = subject_from_module(tiny_causal_lm())
        embedding: nn.Module = subject.model.embed
    else:
        subject = load_subject(name, manager=manager)
        embedding = subject.model.get_input_embeddings()
    result = check(subject, "integrated_gradients")
    assert result.status == "pass", result.message
    d = result.details
    # Completeness: the attributions sum to f(x) - f(baseline) within the reported delta.
    assert sum(d["attributions"]) == pytest.approx(d["attributions_sum"], abs=1e-5)
    assert abs(d["attributions_sum"] - d["difference"]) <= d["delta"] + 1e-6
    assert d["difference"] == pytest.approx(d["f_input"] - d["f_baseline"])
    assert result.value == pytest.approx(d["delta"] / abs(d["difference"]))
    assert result.value <= 0.05 and result.threshold == {"warn": 0.05, "fail": 0.5}
    assert len(d["attributions"]) == len(d["input_ids"]) == 12
    # Encoders are attributed at the middle position, decoders at the last.
    assert d["position"] == (6 if name == "tiny-bert" else 11)
    expected = direct_captum(subject.model, embedding, d, subject.pad_token_id or 0)
    np.testing.assert_allclose(d["attributions"], expected.detach().numpy(), atol=1e-5)


def test_integrated_gradients_retry_with_more_steps_on_a_zero_baseline(
    manager: ModelManager,
) -> None:
    # tiny-llama's pad row is zeros and feeds RMSNorm: a steep start to the path.
    result = check(load_subject("tiny-llama", manager=manager), "integrated_gradients", ig_steps=4)
    attempts = result.details["attempts"]
    assert [a["steps"] for a in attempts] == [4, 16]
    assert attempts[0]["relative_delta"] > 0.05
    assert result.details["baseline_embedding_is_zero"] is True
    assert result.value == attempts[1]["relative_delta"]
    expected = "pass" if result.value <= 0.05 else "warn" if result.value <= 0.5 else "fail"
    assert result.status == expected
    if expected != "pass":
        assert "all zeros" in result.message


def test_integrated_gradients_fail_when_no_gradient_reaches_the_embedding() -> None:
    result = check(SteppedLM().eval(), "integrated_gradients")
    assert result.status == "fail"
    assert result.message.startswith("No gradient reaches embed")


def test_integrated_gradients_fail_when_attributions_do_not_explain_the_output() -> None:
    result = check(FragileLM().eval(), "integrated_gradients")
    assert result.status == "fail"
    assert result.value > 0.5
    assert "do not explain the output" in result.message


# -- robustness ---------------------------------------------------------------------------------


def test_robustness_curves_on_tiny_causal_lm() -> None:
    result = check(tiny_causal_lm(), "robustness")
    assert result.status == "pass", result.message
    noise = result.details["noise"]
    assert [p["level"] for p in noise] == [0.01, 0.05, 0.1, 0.5]
    std = result.details["embedding_std"]
    for point in noise:
        assert point["sigma"] == pytest.approx(point["level"] * std)
    assert noise[0]["top1_agreement"] >= 0.9
    assert result.value == noise[0]["top1_agreement"]
    assert 0 < noise[0]["kl"] < noise[-1]["kl"]  # more noise, further from the clean run
    substitution = result.details["substitution"]
    assert [p["tokens_replaced"] for p in substitution] == [2, 4, 8]
    # Attention carries a substituted token's change to positions left alone.
    assert all(p["untouched_mean_abs_logit_change"] > 0 for p in substitution)


def test_substitution_leaves_untouched_positions_of_a_per_token_model() -> None:
    result = check(BagOfTokens().eval(), "robustness")
    for point in result.details["substitution"]:
        assert point["untouched_mean_abs_logit_change"] == 0.0
        assert point["untouched_top1_agreement"] == 1.0
    assert result.details["noise"][0]["kl"] > 0  # the noise itself does reach the logits


def test_tiny_noise_flipping_predictions_warns() -> None:
    result = check(FragileLM().eval(), "robustness")
    assert result.status == "warn"
    assert result.value < 0.5 and result.threshold == 0.5
    assert "unstable to tiny input perturbations" in result.message
