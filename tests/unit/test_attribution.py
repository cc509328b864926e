"""Attribution graphs on the tiny random models with random transcoders, checked against
direct computation: interventions in the local replacement model (the golden test), the
real model's logits, and the affine decomposition of every target."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses.attention import EmptyInputError
from tzoo.circuits.attribution import (
    AttributionGraph,
    attribute,
    attribute_replacement,
    graph_scores,
    influence,
    normalized_adjacency,
    prune,
)
from tzoo.circuits.interventions import (
    FeatureIntervention,
    InterventionError,
    intervene,
    steer,
)
from tzoo.circuits.replacement import (
    ReplacementModel,
    ReplacementUnsupportedError,
    TargetPositionError,
    TranscoderMismatchError,
    build_replacement,
    stack_of,
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

PROMPT = "Cats sat."  # byte-level tokenizers: one token a character
# An encoder predicts masked tokens: its default target is the mask (position 6 after [CLS]).
MASKED_PROMPT = "Cats [MASK] sat."
ATOL = 1e-4
MODELS = ("tiny-llama", "tiny-gpt2", "tiny-bert-mlm")


def prompt_for(handle: ModelHandle) -> str:
    return PROMPT if handle.architecture == "decoder" else MASKED_PROMPT


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("attribution")))


def random_transcoders(
    handle: ModelHandle,
    kind: TranscoderKind,
    seed: int,
    *,
    layers: tuple[int, ...] | None = None,
    activation: ActivationKind = "jumprelu",
    n_features: int = 48,
) -> TranscoderSet:
    """Random transcoders whose features fire on a fair share of tokens at every layer:
    random encoders, biases, thresholds, decoder biases and skip weights; input scales that
    bring the prompt's MLP inputs near norm sqrt(d) (times a random factor) and random
    output scales, so that folding the scales in is exercised."""
    chosen = tuple(range(handle.n_layers)) if layers is None else layers
    config = TranscoderConfig(
        model_name=handle.name,
        kind=kind,
        d_model=handle.d_model,
        n_features=n_features,
        layers=chosen,
        n_model_layers=handle.n_layers,
        activation=activation,
        top_k=6,
        stack=stack_of(handle),
    )
    transcoders = TranscoderSet(config, seed=seed)
    ids = handle.tokenizer(prompt_for(handle), return_tensors="pt")
    _, cache = run_with_cache(handle, ids, sites="mlp_in", attentions=False)
    g = torch.Generator().manual_seed(seed + 1000)
    d = handle.d_model
    with torch.no_grad():
        for i, layer in enumerate(chosen):
            norm = float(cache[config.hook_in(layer)].norm(dim=-1).mean())
            factor = float(torch.rand(1, generator=g)) * 0.5 + 0.8
            transcoders.input_scale[i] = math.sqrt(d) / norm * factor
            transcoders.output_scale[i] = float(torch.rand(1, generator=g)) + 0.5
            transcoders.W_enc[i].copy_(torch.randn(d, n_features, generator=g) / math.sqrt(d))
            transcoders.b_enc[i].copy_(torch.randn(n_features, generator=g) * 0.3)
            transcoders.threshold[i].copy_(torch.rand(n_features, generator=g) * 0.5 + 1.0)
            transcoders.b_dec[i].copy_(torch.randn(d, generator=g) * 0.1)
            if kind == "skip":
                transcoders.W_skip[i].copy_(torch.randn(d, d, generator=g) * 0.3 / math.sqrt(d))
    return transcoders


def demeaned(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(-1, keepdim=True)


def feature_values(rm: ReplacementModel, graph: AttributionGraph, pre: dict[int, Any]) -> Any:
    """(n_features,) the feature nodes' values (pre-activations) in ``pre``."""
    chosen = graph.active_features[graph.selected_features]
    return torch.stack([pre[int(lay)][int(p), int(f)] for lay, p, f in chosen.tolist()])


CASES = [
    (model, kind, seed) for model in MODELS for kind in ("plt", "skip", "clt") for seed in (0, 1, 2)
]


# -- the golden test --------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "kind", "seed"), CASES)
def test_scaling_a_feature_moves_every_target_by_its_edge(
    manager: ModelManager, model: str, kind: TranscoderKind, seed: int
) -> None:
    """In the linear replacement model (attention patterns, norm denominators and every
    other feature's activation fixed), multiplying one feature's activation by ``factor``
    changes each feature pre-activation and each demeaned logit by exactly
    ``(factor - 1) * adjacency[target, source]``."""
    handle = manager.get(model)
    rm = build_replacement(handle, random_transcoders(handle, kind, seed), prompt_for(handle))
    graph = attribute_replacement(rm, max_feature_nodes=None, batch_size=16)
    assert graph.n_features > 20 and graph.n_logits >= 1
    adjacency = graph.adjacency_matrix
    rows = [*range(graph.n_features), *range(graph.logit_start, graph.n_nodes)]

    # Three features of the first layer (they reach later features and the logits) and
    # three of the last at the target position (the last layer's features reach only their
    # own position's logits), drawn at random.
    generator = torch.Generator().manual_seed(seed)
    chosen = graph.active_features[graph.selected_features]
    layer_of = chosen[:, 0]
    last = (layer_of == handle.n_layers - 1) & (chosen[:, 1] == graph.target_position)
    sources = []
    for candidates in ((layer_of == 0).nonzero().squeeze(1), last.nonzero().squeeze(1)):
        picks = torch.randperm(len(candidates), generator=generator)[:3]
        sources += candidates[picks].tolist()
    for factor in (3.0, -0.5):
        for source in sources:
            layer, position, feature = graph.active_features[
                graph.selected_features[source]
            ].tolist()
            result = intervene(
                rm, [FeatureIntervention.scale(layer, position, feature, factor)], mode="direct"
            )
            delta_features = feature_values(rm, graph, result.pre_activations_after) - (
                feature_values(rm, graph, result.pre_activations_before)
            )
            t = graph.target_position
            delta_logits = (demeaned(result.logits_after[t]) - demeaned(result.logits_before[t]))[
                graph.logit_tokens
            ]
            observed = torch.cat([delta_features, delta_logits])
            predicted = (factor - 1) * adjacency[rows, source]
            torch.testing.assert_close(observed, predicted, atol=ATOL, rtol=0)
            # Tiny random models have small logits: also hold small effects to 0.1%, above
            # the float32 rounding of the values differenced (BERT's norms make them big).
            before = feature_values(rm, graph, result.pre_activations_before)
            floor = 3e-7 * max(
                10.0, float(before.abs().max()), float(result.logits_before.abs().max())
            )
            torch.testing.assert_close(observed, predicted, atol=floor, rtol=1e-3)
    # The test means something: first-layer features move later features and logits.
    later = (layer_of > 0).nonzero().squeeze(1)
    assert adjacency[later][:, sources[:3]].abs().max() > 1e-2
    assert adjacency[graph.logit_start :, sources].abs().max() > 1e-3


@pytest.mark.parametrize("model", MODELS)
def test_golden_with_topk_partial_layers_and_an_earlier_target(
    manager: ModelManager, model: str
) -> None:
    """The same check with TopK features, transcoders on the last layer only (the first
    layer's whole MLP is an error node) and logits read at position 3 (any position: an
    encoder's too, though its default is the mask)."""
    handle = manager.get(model)
    transcoders = random_transcoders(handle, "plt", 7, layers=(1,), activation="topk")
    rm = build_replacement(handle, transcoders, prompt_for(handle))
    graph = attribute_replacement(rm, target_position=3, max_feature_nodes=None)
    assert graph.target_position == 3 and graph.transcoder_layers == (1,)
    adjacency = graph.adjacency_matrix
    for source in range(0, graph.n_features, 5):
        layer, position, feature = graph.active_features[graph.selected_features[source]].tolist()
        result = intervene(
            rm, [FeatureIntervention.scale(layer, position, feature, 2.0)], mode="direct"
        )
        delta = demeaned(result.logits_after[3]) - demeaned(result.logits_before[3])
        predicted = adjacency[graph.logit_start :, source]
        torch.testing.assert_close(delta[graph.logit_tokens], predicted, atol=ATOL, rtol=0)
        if position > 3:  # a last-layer feature reaches only its own position's logits
            assert predicted.abs().max() == 0
    # What layer 0 writes after the target reaches it through layer 1's attention in an
    # encoder, which attends both ways, and never in a decoder, which is causal.
    later = [graph.error_node(0, p) for p in range(4, graph.n_tokens)]
    later_reach = float(adjacency[graph.logit_start :, later].abs().max())
    assert (later_reach > 1e-6) if handle.architecture == "encoder" else (later_reach == 0)
    # The uncovered layer's error nodes carry its whole MLP output, and do reach the logits.
    errors = adjacency[graph.logit_start :, graph.error_node(0, 0) : graph.error_node(1, 0)]
    assert errors.abs().max() > 0


# -- the replacement model --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kind"), [(m, k) for m in MODELS for k in ("plt", "skip", "clt")]
)
def test_error_nodes_make_the_replacement_reproduce_the_model(
    manager: ModelManager, model: str, kind: TranscoderKind
) -> None:
    handle = manager.get(model)
    rm = build_replacement(handle, random_transcoders(handle, kind, 3), prompt_for(handle))
    with torch.no_grad():
        real = handle.model(input_ids=rm.input_ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(rm.unembed(rm.forward().final), real, atol=ATOL, rtol=0)
    # Each pass recomputes what the layers read: the real MLP inputs come back.
    torch.testing.assert_close(torch.stack(rm.forward().mlp_inputs), rm.mlp_in, atol=ATOL, rtol=0)
    # Without errors the transcoders alone predict something else (they are random).
    no_errors = rm.constants(errors=torch.zeros_like(rm.errors))
    assert (rm.unembed(rm.forward(None, no_errors).final) - real).abs().max() > 1e-3
    for mode in ("direct", "frozen", "live"):
        result = intervene(rm, [], mode=mode)
        torch.testing.assert_close(result.logits_after, real, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_each_target_is_the_sum_of_its_edges_plus_biases(
    manager: ModelManager, model: str, kind: TranscoderKind
) -> None:
    """Completeness of the linear decomposition: a target's value is the sum of its incoming
    edges plus what no node carries, measured by running the replacement model with every
    node's source vector at zero."""
    handle = manager.get(model)
    transcoders = random_transcoders(handle, kind, 4)
    prompt = prompt_for(handle)
    graph = attribute(handle, transcoders, prompt, max_feature_nodes=None, batch_size=32)
    rm = build_replacement(handle, transcoders, prompt)
    # llama's tokenizer adds <s>, BERT's [CLS]; GPT-2's adds nothing
    assert graph.bos_excluded == (model != "tiny-gpt2")

    clean = rm.forward()
    values = torch.cat(
        [
            feature_values(
                rm, graph, {lay: rm.encode(lay, clean.mlp_inputs[lay]) for lay in rm.layers}
            ),
            demeaned(rm.unembed(clean.final)[graph.target_position])[graph.logit_tokens],
        ]
    )
    # Sources off: no feature (except at an excluded BOS), no error (same), no embedding.
    keep = 1 if graph.bos_excluded else 0
    acts = {lay: a.clone() for lay, a in rm.activations.items()}
    errors = rm.errors.clone()
    for a in acts.values():
        a[keep:] = 0
    errors[:, keep:] = 0
    bias_pass = rm.forward(torch.zeros_like(rm.embeddings), rm.constants(acts, errors))
    biases = torch.cat(
        [
            feature_values(
                rm, graph, {lay: rm.encode(lay, bias_pass.mlp_inputs[lay]) for lay in rm.layers}
            ),
            demeaned(rm.unembed(bias_pass.final)[graph.target_position])[graph.logit_tokens],
        ]
    )
    rows = [*range(graph.n_features), *range(graph.logit_start, graph.n_nodes)]
    torch.testing.assert_close(
        graph.adjacency_matrix[rows].sum(1) + biases, values, atol=ATOL, rtol=0
    )


def test_batched_backward_passes_match_one_per_target(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    rm = build_replacement(handle, random_transcoders(handle, "clt", 5), PROMPT)
    batched = attribute_replacement(rm, max_feature_nodes=None, batch_size=7)
    naive = attribute_replacement(rm, max_feature_nodes=None, batched=False)
    torch.testing.assert_close(batched.adjacency_matrix, naive.adjacency_matrix, atol=1e-5, rtol=0)
    assert naive.stats["backward_passes"] == naive.n_features + naive.n_logits
    assert batched.stats["backward_passes"] < naive.stats["backward_passes"] / 5


def test_capped_graph_keeps_the_most_influential_features(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    rm = build_replacement(handle, random_transcoders(handle, "plt", 6), PROMPT)
    full = attribute_replacement(rm, max_feature_nodes=None)
    capped = attribute_replacement(rm, max_feature_nodes=12, batch_size=4, update_interval=1)
    assert capped.n_features == 12 and capped.n_logits == full.n_logits
    # The capped graph's edges are the full graph's, restricted to its nodes.
    index = torch.cat(
        [
            full.selected_features.new_tensor(
                [int((full.selected_features == s).nonzero()) for s in capped.selected_features]
            ),
            torch.arange(full.error_start, full.n_nodes),
        ]
    )
    torch.testing.assert_close(
        capped.adjacency_matrix, full.adjacency_matrix[index][:, index], atol=1e-5, rtol=0
    )
    # The features kept include the one with the strongest direct effect on the top logit.
    strongest = full.adjacency_matrix[full.logit_start, : full.n_features].abs().argmax()
    assert full.selected_features[strongest] in capped.selected_features


# -- influence, pruning, scores ---------------------------------------------------------------


@pytest.fixture(scope="module")
def graph(manager: ModelManager) -> AttributionGraph:
    handle = manager.get("tiny-llama")
    return attribute(handle, random_transcoders(handle, "plt", 8), PROMPT, max_feature_nodes=None)


def test_influence_sums_every_path_length(graph: AttributionGraph) -> None:
    normalized = normalized_adjacency(graph.adjacency_matrix).double()
    weights = graph.logit_weights().double()
    identity = torch.eye(graph.n_nodes, dtype=torch.float64)
    expected = weights @ (torch.linalg.inv(identity - normalized) - identity)
    torch.testing.assert_close(influence(normalized, weights), expected, atol=1e-9, rtol=1e-6)


def test_pruning_keeps_logits_and_tokens_and_is_monotone(graph: AttributionGraph) -> None:
    thresholds = (0.0, 0.3, 0.6, 0.8, 0.9, 0.98, 1.0)
    results = {(n, e): prune(graph, n, e) for n in thresholds for e in thresholds}
    for (n, e), result in results.items():
        assert result.node_mask[graph.token_start :].all()
        # A kept edge joins kept nodes; a kept feature has kept edges in and out.
        kept = result.node_mask
        assert not (result.edge_mask & ~(kept[:, None] & kept[None, :])).any()
        features = kept[: graph.n_features]
        assert (result.edge_mask[: graph.n_features].any(1) | ~features).all()
        assert (result.edge_mask[:, : graph.n_features].any(0) | ~features).all()
        for n2, e2 in ((n, e) for n in thresholds for e in thresholds):
            if n2 >= n and e2 >= e:
                bigger = results[n2, e2]
                assert not (result.node_mask & ~bigger.node_mask).any()
                assert not (result.edge_mask & ~bigger.edge_mask).any()
    default = prune(graph)
    assert 0 < default.node_mask[: graph.n_features].sum() < graph.n_features
    assert default.cumulative_scores.max() <= 1 + 1e-6
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            prune(graph, node_threshold=bad)
        with pytest.raises(ValueError, match="threshold"):
            prune(graph, edge_threshold=bad)


def test_scores_follow_circuit_tracer(graph: AttributionGraph) -> None:
    scores = graph_scores(graph)
    assert 0 <= scores.replacement <= 1 and 0 <= scores.completeness <= 1
    # Written out: completeness weighs each node's non-error input share by its influence.
    normalized = normalized_adjacency(graph.adjacency_matrix)
    weights = graph.logit_weights()
    reach = influence(normalized, weights)
    errors = slice(graph.error_start, graph.token_start)
    out = reach + weights
    expected = float(((1 - normalized[:, errors].sum(1)) * out).sum() / out.sum())
    assert scores.completeness == pytest.approx(expected, abs=1e-6)
    tokens = reach[graph.token_start : graph.logit_start].sum()
    assert scores.replacement == pytest.approx(float(tokens / (tokens + reach[errors].sum())))
    # With no error edges at all, everything is explained by features and tokens.
    perfect = AttributionGraph(
        **{**vars(graph), "adjacency_matrix": graph.adjacency_matrix.clone()}
    )
    perfect.adjacency_matrix[:, errors] = 0
    assert graph_scores(perfect) == pytest.approx((1.0, 1.0))


# -- interventions ----------------------------------------------------------------------------


def test_interventions_in_each_mode(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    transcoders = random_transcoders(handle, "plt", 9)
    rm = build_replacement(handle, transcoders, PROMPT)
    late = int((rm.activations[1][-1] != 0).nonzero()[0])
    change = [FeatureIntervention.set(1, -1, int(late), 25.0)]
    direct = intervene(rm, change, mode="direct", top_k=5)
    frozen = intervene(rm, change, mode="frozen", top_k=5)
    live = steer(handle, transcoders, PROMPT, change, mode="live", top_k=5)
    # The last layer's feature has no later features to move: direct and frozen agree.
    torch.testing.assert_close(direct.logits_after, frozen.logits_after, atol=ATOL, rtol=0)
    assert (direct.logits_after[-1] - direct.logits_before[-1]).abs().max() > 1e-2
    assert float(frozen.activations_after[1][-1, late]) == 25.0
    for result in (direct, frozen, live):
        assert len(result.top_after) == 5 and result.position == rm.n_tokens - 1
        probs = [t.probability for t in result.top_after]
        assert probs == sorted(probs, reverse=True)
    # Live mode at the last layer: the same change through the real (unfrozen) final norm.
    assert (live.logits_after[-1] - live.logits_before[-1]).abs().max() > 1e-2
    # An early feature, scaled: frozen mode lets later features respond, direct does not.
    early = int(rm.activations[0][2].nonzero()[0])
    scaled = [FeatureIntervention.scale(0, 2, int(early), 10.0)]
    held = intervene(rm, scaled, mode="direct")
    moved = intervene(rm, scaled, mode="frozen")
    torch.testing.assert_close(
        moved.pre_activations_after[1], held.pre_activations_after[1], atol=ATOL, rtol=0
    )
    assert torch.equal(held.activations_after[1], rm.activations[1])
    torch.testing.assert_close(
        moved.activations_after[1], rm.activate(1, moved.pre_activations_after[1])
    )


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(manager: ModelManager) -> None:
    llama = manager.get("tiny-llama")
    transcoders = random_transcoders(llama, "plt", 0)
    with pytest.raises(EmptyInputError, match="empty"):
        attribute(llama, transcoders, "")
    with pytest.raises(EmptyInputError, match="empty"):
        attribute(llama, transcoders, "   ")
    with pytest.raises(EmptyInputError, match="no tokens"):
        attribute(llama, transcoders, [])
    with pytest.raises(TargetPositionError, match="outside the prompt"):
        attribute(llama, transcoders, PROMPT, target_position=50)
    with pytest.raises(TargetPositionError, match="outside the prompt"):
        attribute(llama, transcoders, PROMPT, target_position=-50)
    with pytest.raises(ValueError, match="batch_size"):
        attribute(llama, transcoders, PROMPT, batch_size=0)

    gpt2 = manager.get("tiny-gpt2")
    with pytest.raises(TranscoderMismatchError, match="trained on 'tiny-gpt2'"):
        attribute(llama, random_transcoders(gpt2, "plt", 0), PROMPT)
    narrow = TranscoderSet(
        TranscoderConfig(
            model_name="tiny-llama",
            kind="plt",
            d_model=32,
            n_features=8,
            layers=(0,),
            n_model_layers=2,
        )
    )
    with pytest.raises(TranscoderMismatchError, match="width is 32"):
        attribute(llama, narrow, PROMPT)
    deeper = TranscoderSet(
        TranscoderConfig(
            model_name="tiny-llama",
            kind="plt",
            d_model=64,
            n_features=8,
            layers=(0,),
            n_model_layers=4,
        )
    )
    with pytest.raises(TranscoderMismatchError, match="expect 4 layers"):
        attribute(llama, deeper, PROMPT)

    bert = manager.get("tiny-bert")
    bert_transcoders = TranscoderSet(
        TranscoderConfig(
            model_name="tiny-bert",
            kind="plt",
            d_model=64,
            n_features=8,
            layers=(0,),
            n_model_layers=2,
            stack="encoder",
        )
    )
    # A bare encoder (as minilm-l6) has no head, so no logits to attribute.
    with pytest.raises(ReplacementUnsupportedError, match="without a masked-LM head"):
        attribute(bert, bert_transcoders, MASKED_PROMPT)
    mlm = manager.get("tiny-bert-mlm")
    mlm_transcoders = random_transcoders(mlm, "plt", 0)
    with pytest.raises(TargetPositionError, match=r"predicts masked tokens.*\[MASK\]"):
        attribute(mlm, mlm_transcoders, PROMPT)  # no mask and no position
    assert attribute(mlm, mlm_transcoders, PROMPT, target_position=2).target_position == 2
    mlm_transcoders.config = dataclasses.replace(mlm_transcoders.config, stack="decoder")
    with pytest.raises(TranscoderMismatchError, match="not the encoder's MLP"):
        attribute(mlm, mlm_transcoders, MASKED_PROMPT)
    t5 = manager.get("tiny-t5")
    with pytest.raises(ReplacementUnsupportedError, match="cross-attention"):
        attribute(t5, bert_transcoders, PROMPT)

    rm = build_replacement(llama, transcoders, PROMPT)
    for bad, message in (
        (FeatureIntervention.scale(5, 0, 0, 2.0), "No transcoder at layer 5"),
        (FeatureIntervention.scale(0, 0, 99, 2.0), "Feature 99"),
        (FeatureIntervention.scale(0, 40, 0, 2.0), "outside the prompt"),
    ):
        with pytest.raises(InterventionError, match=message):
            intervene(rm, [bad])
    with pytest.raises(InterventionError, match="value or a factor"):
        FeatureIntervention(0, 0, 0)
    with pytest.raises(InterventionError, match="mode"):
        intervene(rm, [], mode=cast(Any, "sideways"))


def test_transcoders_named_by_a_hub_id_fit_their_bundled_model(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """circuit-tracer's files name a bundled model by its hub id (as `io` writes them)."""
    from dataclasses import replace

    from tzoo.circuits import replacement

    handle = manager.get("tiny-llama")
    monkeypatch.setitem(replacement.HUB_IDS, "tiny-llama", "example/tiny-llama")
    transcoders = random_transcoders(handle, "plt", 0)
    transcoders.config = replace(transcoders.config, model_name="example/tiny-llama")
    replacement.check_transcoders(handle, transcoders)
    transcoders.config = replace(transcoders.config, model_name="example/other")
    with pytest.raises(replacement.TranscoderMismatchError, match="trained on 'example/other'"):
        replacement.check_transcoders(handle, transcoders)
