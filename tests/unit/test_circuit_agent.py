"""The circuit agent on tiny-llama with random transcoders: the paths are the strongest
by brute force, a forced target is traced whatever its probability, and features on the
paths get labels from a real (tiny, meaningless) local explainer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_attribution import PROMPT, random_transcoders
from tzoo_testing import make_settings

from tzoo.circuits.agent import TargetTokenError, explain_circuit, strongest_paths, target_token_id
from tzoo.circuits.attribution import AttributionGraph, attribute, normalized_adjacency
from tzoo.circuits.labels import LocalExplainer
from tzoo.runtime.manager import ModelManager


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("agent")))


@pytest.fixture(scope="module")
def graph(manager: ModelManager) -> AttributionGraph:
    handle = manager.get("tiny-llama")
    return attribute(handle, random_transcoders(handle, "plt", 0), PROMPT, max_feature_nodes=24)


def all_paths(graph: AttributionGraph, node: int) -> list[tuple[float, list[int]]]:
    """Every path into ``node`` from a node without incoming edges, with its strength."""
    shares = normalized_adjacency(graph.adjacency_matrix)
    row = shares[node]
    if not row.any():
        return [(1.0, [node])]
    found = []
    for source in row.nonzero().flatten().tolist():
        for strength, path in all_paths(graph, source):
            found.append((strength * float(row[source]), [*path, node]))
    return found


def test_the_strongest_paths_are_the_strongest_by_brute_force(graph: AttributionGraph) -> None:
    target = graph.logit_start
    brute = sorted(all_paths(graph, target), key=lambda entry: entry[0], reverse=True)
    paths = strongest_paths(graph, target, n_paths=3, beam_width=10_000, branching=10_000)
    assert [p.strength for p in paths] == pytest.approx([s for s, _ in brute[:3]], rel=1e-6)
    assert [s.node for s in paths[0].steps] == brute[0][1]
    first = paths[0]
    assert first.steps[-1].kind == "logit" and first.steps[0].kind in ("token", "error")
    # The strength is the product of the normalised shares; the sign that of the weights.
    shares = normalized_adjacency(graph.adjacency_matrix)
    nodes = [s.node for s in first.steps]
    product = math.prod(float(shares[b, a]) for a, b in itertools.pairwise(nodes))
    assert first.strength == pytest.approx(product)
    signs = [s.edge_to_next for s in first.steps[:-1]]
    assert first.sign == (1 if math.prod(1 if w > 0 else -1 for w in signs) > 0 else -1)
    assert "logit" in first.describe()


def test_a_narrow_beam_still_finds_real_paths(graph: AttributionGraph) -> None:
    paths = strongest_paths(graph, graph.logit_start, n_paths=2, beam_width=2, branching=2)
    assert 1 <= len(paths) <= 2 and all(0 < p.strength <= 1 for p in paths)


def test_a_forced_unlikely_target_is_traced_and_labelled(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle, "plt", 1)
    with torch.no_grad():
        logits = handle.model(**handle.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
    unlikely = int(logits.argmin())
    answer = explain_circuit(
        handle,
        transcoders,
        PROMPT,
        unlikely,
        n_paths=2,
        explainer=LocalExplainer(handle),
        corpus=["The cat sat on the mat.", "A dog barked twice at the moon."],
    )
    assert answer.target_token == unlikely
    assert answer.target_probability == pytest.approx(
        float(torch.softmax(logits, -1)[unlikely]), rel=1e-3
    )
    assert answer.paths and all(p.steps[-1].text == answer.target_text for p in answer.paths)
    features = {(s.layer, s.feature) for p in answer.paths for s in p.steps if s.kind == "feature"}
    assert set(answer.labels) == {f"{layer}/{feature}" for layer, feature in features}
    assert all(isinstance(label, str) and label for label in answer.labels.values())
    labelled = [s.label for p in answer.paths for s in p.steps if s.kind == "feature"]
    assert all(labelled)


def test_targets_must_be_one_token(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    with pytest.raises(TargetTokenError, match="is 5 tokens"):
        target_token_id(handle, "Paris")  # byte-level: one token per byte
    with pytest.raises(TargetTokenError, match="outside the vocabulary"):
        target_token_id(handle, 10**9)
    with pytest.raises(TargetTokenError, match="empty"):
        target_token_id(handle, "")
    assert (
        target_token_id(handle, "P")
        == handle.tokenizer("P", add_special_tokens=False)["input_ids"][0]
    )
