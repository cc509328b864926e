"""Active features and feature dashboards on the tiny models with random transcoders,
checked against a brute-force computation: every text run alone through
``run_with_cache``, every activation from ``TranscoderSet.encode``/``activate``."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses.attention import EmptyInputError
from tzoo.analyses.corpus import shipped_corpus
from tzoo.circuits.features import (
    ActiveFeatures,
    FeatureDashboard,
    TranscoderMismatchError,
    active_features,
    build_dashboards,
    detection_contexts,
)
from tzoo.circuits.transcoders import (
    ActivationKind,
    TranscoderConfig,
    TranscoderKind,
    TranscoderSet,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import run_with_cache
from tzoo.runtime.manager import ModelManager

N_FEATURES = 32
MAX_TOKENS = 64
REL = 2e-3  # results keep 4 significant digits


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("features")))


def random_transcoders(
    handle: ModelHandle,
    kind: TranscoderKind = "plt",
    activation: ActivationKind = "jumprelu",
    seed: int = 0,
) -> TranscoderSet:
    """Random transcoders for every layer, with random encoder biases (std 0.1, about the
    pre-activations' own spread) so that features fire at varied rates, and random decoder
    biases and scales."""
    config = TranscoderConfig(
        model_name=handle.name,
        kind=kind,
        d_model=handle.d_model,
        n_features=N_FEATURES,
        layers=tuple(range(handle.n_layers)),
        n_model_layers=handle.n_layers,
        activation=activation,
        top_k=4,
    )
    transcoders = TranscoderSet(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b_enc, b_dec in zip(transcoders.b_enc, transcoders.b_dec, strict=True):
            b_enc.copy_(torch.randn(b_enc.shape, generator=generator) * 0.1)
            b_dec.copy_(torch.randn(b_dec.shape, generator=generator) * 0.1)
        transcoders.input_scale.copy_(1 + torch.rand(len(config.layers), generator=generator))
        transcoders.output_scale.copy_(1 + torch.rand(len(config.layers), generator=generator))
        for w_skip in transcoders.W_skip:
            w_skip.copy_(torch.randn(w_skip.shape, generator=generator) * 0.01)
    return transcoders


def corpus() -> list[str]:
    return [*shipped_corpus()[:5], "Short one.", "The cat sat on the mat, and the cat slept."]


def direct_activations(
    handle: ModelHandle, transcoders: TranscoderSet, ids: list[int]
) -> dict[int, np.ndarray]:
    """Layer -> (T, F) activations of one text from run_with_cache, 0 at special tokens."""
    input_ids = torch.tensor([ids])
    _, cache = run_with_cache(
        handle,
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
        sites=["mlp_in"],
        stacks="decoder",
        attentions=False,
    )
    special = set(handle.tokenizer.all_special_ids)
    keep = torch.tensor([[i not in special] for i in ids], dtype=torch.float32)  # (T, 1)
    found = {}
    with torch.no_grad():
        for layer in transcoders.layers:
            x = cache[f"decoder.{layer}.mlp_in"][0]
            found[layer] = (
                transcoders.activate(layer, transcoders.encode(layer, x)) * keep
            ).numpy()
    return found


@dataclass
class BruteForce:
    ids: list[list[int]]  # per text, truncated
    acts: list[dict[int, np.ndarray]]  # per text, layer -> (T, F)
    n_tokens: int  # non-special tokens
    special: set[int]

    def values(self, layer: int, feature: int) -> np.ndarray:
        """Every non-special token's activation, all texts."""
        special = self.special
        return np.concatenate(
            [
                a[layer][[i not in special for i in ids], feature]
                for a, ids in zip(self.acts, self.ids, strict=True)
            ]
        )


def brute_force(handle: ModelHandle, transcoders: TranscoderSet, texts: list[str]) -> BruteForce:
    ids = [[int(i) for i in handle.tokenizer(t)["input_ids"]][:MAX_TOKENS] for t in texts]
    special = set(handle.tokenizer.all_special_ids)
    acts = [direct_activations(handle, transcoders, row) for row in ids]
    n_tokens = sum(1 for row in ids for i in row if i not in special)
    return BruteForce(ids, acts, n_tokens, special)


CASES: list[tuple[str, TranscoderKind, ActivationKind]] = [
    ("tiny-llama", "plt", "jumprelu"),
    ("tiny-gpt2", "clt", "topk"),
    ("tiny-llama", "skip", "jumprelu"),
]


# -- active features ------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "kind", "activation"), CASES)
def test_active_features_match_direct_computation(
    manager: ModelManager, model: str, kind: TranscoderKind, activation: ActivationKind
) -> None:
    handle = manager.get(model)
    transcoders = random_transcoders(handle, kind, activation)
    text = "The cat sat on the mat. The cat"
    result = active_features(handle, transcoders, text, k=6)
    ids = [int(i) for i in handle.tokenizer(text)["input_ids"]]
    direct = direct_activations(handle, transcoders, ids)
    assert result.token_ids == ids and len(result.positions) == len(ids)
    n_active = 0
    for t, row in enumerate(result.positions):
        every = sorted(
            (
                (float(direct[layer][t, f]), layer, f)
                for layer in direct
                for f in range(N_FEATURES)
                if direct[layer][t, f] > 0
            ),
            reverse=True,
        )[:6]
        assert [(f.layer, f.feature) for f in row] == [(layer, f) for _, layer, f in every]
        for feature, (value, _, _) in zip(row, every, strict=True):
            assert feature.activation == pytest.approx(value, rel=REL)
        n_active += len(row)
    assert n_active > len(ids)  # the test means something: features do fire
    if handle.tokenizer.all_special_ids and ids[0] in handle.tokenizer.all_special_ids:
        assert result.positions[0] == []  # BOS has no features
    again = ActiveFeatures.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_active_features_on_some_layers_and_bad_input(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle)
    result = active_features(handle, transcoders, "Hello there", k=3, layers=[1])
    assert {f.layer for row in result.positions for f in row} == {1}
    with pytest.raises(EmptyInputError):
        active_features(handle, transcoders, "   ")
    with pytest.raises(KeyError, match="No transcoder for layer 5"):
        active_features(handle, transcoders, "Hello", layers=[5])
    gpt2 = manager.get("tiny-gpt2")
    wrong = TranscoderSet(
        TranscoderConfig("x", "plt", d_model=32, n_features=8, layers=(0,), n_model_layers=2)
    )
    with pytest.raises(TranscoderMismatchError, match="width 32"):
        active_features(gpt2, wrong, "Hello")


# -- dashboards -----------------------------------------------------------------------------


def build(handle: ModelHandle, transcoders: TranscoderSet, **options: Any) -> dict[Any, Any]:
    values: dict[str, Any] = {
        "contexts_per_feature": 4,
        "quantiles": 4,
        "samples_per_quantile": 3,
        "window": 5,
        "n_logits": 5,
        "histogram_bins": 16,
        "max_tokens": MAX_TOKENS,
        "batch_tokens": 200,  # several batches
    }
    values.update(options)
    return build_dashboards(handle, transcoders, corpus(), **values)


@pytest.mark.parametrize(("model", "kind", "activation"), CASES)
def test_dashboards_against_brute_force(
    manager: ModelManager, model: str, kind: TranscoderKind, activation: ActivationKind
) -> None:
    handle = manager.get(model)
    transcoders = random_transcoders(handle, kind, activation)
    calls: list[tuple[int, int]] = []
    dashboards = build(handle, transcoders, progress=lambda d, t: calls.append((d, t)))
    brute = brute_force(handle, transcoders, corpus())
    assert set(dashboards) == {
        (layer, f) for layer in transcoders.layers for f in range(N_FEATURES)
    }
    assert calls == [(i + 1, calls[-1][1]) for i in range(len(calls))] and len(calls) > 2
    firing = 0
    for (layer, feature), dashboard in dashboards.items():
        values = brute.values(layer, feature)
        assert dashboard.n_tokens == brute.n_tokens
        assert dashboard.n_active == int((values > 0).sum())
        assert dashboard.frequency == pytest.approx(dashboard.n_active / brute.n_tokens, rel=REL)
        assert sum(dashboard.histogram.counts) == dashboard.n_active
        assert sum(q.n_active for q in dashboard.quantiles) == dashboard.n_active
        if not dashboard.n_active:
            assert dashboard.top_contexts == [] and dashboard.histogram.counts == []
            continue
        firing += 1
        assert dashboard.max_activation == pytest.approx(values.max(), rel=REL)
        assert dashboard.mean_activation == pytest.approx(values[values > 0].mean(), rel=REL)
        check_top_contexts(dashboard, brute)
        check_quantiles(dashboard, brute)
        check_histogram(dashboard, values[values > 0])
    assert firing >= N_FEATURES  # most features fire on this corpus
    check_logits(handle, transcoders, dashboards)


def check_top_contexts(dashboard: FeatureDashboard, brute: BruteForce) -> None:
    layer, feature = dashboard.key
    per_text = sorted((a[layer][:, feature].max() for a in brute.acts), reverse=True)
    expected = [m for m in per_text[:4] if m > 0]
    top = dashboard.top_contexts
    # One context per text, from the texts with the highest maxima, strongest first (texts
    # sharing a beginning tie); the first is where the activation is maximal over the
    # whole corpus.
    assert len({c.document for c in top}) == len(top)
    np.testing.assert_allclose([c.activation for c in top], expected, rtol=REL)
    for context in top:
        acts = brute.acts[context.document][layer][:, feature]
        assert context.activation == pytest.approx(acts.max(), rel=REL)
        assert acts[context.position] == acts.max()
        check_window(context, brute, layer, feature)
    assert top[0].activation == pytest.approx(dashboard.max_activation, rel=REL)


def check_window(context: Any, brute: BruteForce, layer: int, feature: int) -> None:
    """The window's tokens are the text's non-special tokens around the position, with
    their activations."""
    ids = brute.ids[context.document]
    acts = brute.acts[context.document][layer][:, feature]
    lo, hi = max(0, context.position - 5), min(len(ids), context.position + 6)
    kept = [t for t in range(lo, hi) if ids[t] not in brute.special]
    assert context.token_ids == [ids[t] for t in kept]
    assert context.index == kept.index(context.position)
    np.testing.assert_allclose(context.activations, acts[kept], rtol=REL, atol=1e-6)
    assert len(context.tokens) == len(context.token_ids)


def check_quantiles(dashboard: FeatureDashboard, brute: BruteForce) -> None:
    layer, feature = dashboard.key
    bins = dashboard.quantiles
    assert len(bins) == 4
    assert bins[0].low == 0 and bins[-1].high == pytest.approx(dashboard.max_activation)
    assert all(a.high == b.low for a, b in itertools.pairwise(bins))
    for quantile in bins:
        assert len(quantile.contexts) == min(3, quantile.n_active)
        positions = {(c.document, c.position) for c in quantile.contexts}
        assert len(positions) == len(quantile.contexts)  # drawn without replacement
        for context in quantile.contexts:
            value = brute.acts[context.document][layer][context.position, feature]
            assert context.activation == pytest.approx(value, rel=REL)
            slack = 1e-3 * dashboard.max_activation  # edges keep 4 digits
            assert quantile.low - slack < value <= quantile.high + slack
            check_window(context, brute, layer, feature)
    # Bins of about equal count (the edges come from a 256-bin histogram).
    if dashboard.n_active >= 40:
        assert max(q.n_active for q in bins) <= 0.5 * dashboard.n_active


def check_histogram(dashboard: FeatureDashboard, active: np.ndarray) -> None:
    edges = np.array(dashboard.histogram.edges)
    counts = np.array(dashboard.histogram.counts)
    assert len(edges) == len(counts) + 1 and counts[-1] > 0
    assert edges[0] == 0 and edges[-2] <= active.max() * (1 + REL)
    assert active.max() <= edges[-1] * (1 + REL)  # the top bin holds the max
    assert len(counts) >= 8  # the max sits in the upper half of 16 bins
    expected, _ = np.histogram(active, bins=edges)
    near_edge = np.abs(active[:, None] - edges[None, :]).min(axis=1) < 1e-3 * edges[-1]
    assert np.abs(expected - counts).sum() <= 2 * near_edge.sum()


def check_logits(
    handle: ModelHandle, transcoders: TranscoderSet, dashboards: dict[Any, FeatureDashboard]
) -> None:
    """Top and bottom logits: the decoder row (a CLT's into the last layer) times the final
    norm's weight (centred first for LayerNorm), times the unembedding."""
    model: Any = handle.model
    norm = model.model.norm if handle.family == "llama" else model.transformer.ln_f
    unembedding = model.lm_head.weight.detach().double()
    for layer in transcoders.layers:
        w_dec = transcoders.folded(layer).W_dec.double()
        if w_dec.dim() == 3:
            w_dec = w_dec[:, -1]
        if handle.family == "gpt2":
            w_dec = w_dec - w_dec.mean(-1, keepdim=True)
        logits = (w_dec * norm.weight.detach().double()) @ unembedding.T  # (F, V)
        for feature in range(N_FEATURES):
            dashboard = dashboards[(layer, feature)]
            expected_layer = transcoders.layers[-1] if transcoders.config.kind == "clt" else layer
            assert dashboard.logits_layer == expected_layer
            top = logits[feature].topk(5)
            bottom = (-logits[feature]).topk(5)
            assert [t.token_id for t in dashboard.top_logits] == top.indices.tolist()
            assert [t.token_id for t in dashboard.bottom_logits] == bottom.indices.tolist()
            np.testing.assert_allclose(
                [t.logit for t in dashboard.top_logits], top.values.numpy(), rtol=REL
            )
            np.testing.assert_allclose(
                [t.logit for t in dashboard.bottom_logits], -bottom.values.numpy(), rtol=REL
            )


def test_dashboards_round_trip_through_json(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle)
    dashboards = build(handle, transcoders, features=[0, 1, 2, 3], inactive_contexts=2)
    for dashboard in dashboards.values():
        text = json.dumps(dashboard.to_dict())
        assert FeatureDashboard.from_dict(json.loads(text)) == dashboard
    with pytest.raises(ValueError, match="version"):
        FeatureDashboard.from_dict({**dashboard.to_dict(), "version": 99})


def test_dashboards_split_into_passes_give_the_same_statistics(manager: ModelManager) -> None:
    """A small memory budget splits the features into groups, one corpus pass each."""
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle)
    calls: list[tuple[int, int]] = []
    chosen = {0: range(6), 1: range(6)}
    whole = build(handle, transcoders, features=chosen, progress=lambda d, t: calls.append((d, t)))
    one_group = calls[-1][1]
    # About 8.6 kB a feature here: room for 4 features, so 3 groups.
    split = build(
        handle,
        transcoders,
        features=chosen,
        memory_mb=0.035,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls[-1][1] == 3 * one_group
    assert split.keys() == whole.keys()
    for key, dashboard in whole.items():
        other = split[key]
        assert other.top_contexts == dashboard.top_contexts
        assert other.histogram == dashboard.histogram
        assert (other.n_active, other.max_activation) == (
            dashboard.n_active,
            dashboard.max_activation,
        )
        assert [q.n_active for q in other.quantiles] == [q.n_active for q in dashboard.quantiles]


def test_feature_selection_and_inactive_contexts(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle)
    dashboards = build(handle, transcoders, features={1: [3, 5]}, quantiles=0, inactive_contexts=3)
    assert set(dashboards) == {(1, 3), (1, 5)}
    for dashboard in dashboards.values():
        assert dashboard.quantiles == []
        assert len(dashboard.inactive_contexts) == 3
        for context in dashboard.inactive_contexts:
            assert context.max_activation == 0 and len(context.tokens) > 1
    with pytest.raises(ValueError, match="histogram_bins"):
        build(handle, transcoders, histogram_bins=7)
    with pytest.raises(ValueError, match="window must not be negative"):
        build(handle, transcoders, window=-1)
    with pytest.raises(EmptyInputError):
        build_dashboards(handle, transcoders, ["", ""])
    with pytest.raises(ValueError, match="do not exist"):
        build(handle, transcoders, features=[N_FEATURES])


def test_detection_contexts_mix_activating_and_silent(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle)
    dashboards = build(handle, transcoders, layers=[0], quantiles=0, contexts_per_feature=1)
    # A feature neither rare nor everywhere: silent windows exist.
    layer, feature = min(dashboards, key=lambda k: abs(dashboards[k].frequency - 0.05))
    contexts = detection_contexts(
        handle,
        transcoders,
        corpus(),
        layer,
        feature,
        n_activating=5,
        n_non_activating=4,
        window=4,
    )
    activating = [c for c in contexts if c.max_activation > 0]
    assert len(activating) == 5 and len(contexts) == 9
    assert all(c.activation > 0 for c in activating)
