"""circuit-tracer's graph JSON: written from a pruned attribution graph, read back, and
malformed files refused with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_attribution import PROMPT, random_transcoders
from tzoo_testing import make_settings

from tzoo.circuits.attribution import AttributionGraph, attribute, prune
from tzoo.circuits.graph_json import (
    GraphFile,
    GraphJSONError,
    read_graph_json,
    to_graph_json,
    write_graph_json,
)
from tzoo.runtime.manager import ModelManager

METADATA_KEYS = {
    "slug",
    "scan",
    "transcoder_list",
    "prompt_tokens",
    "prompt",
    "node_threshold",
    "schema_version",
}
QPARAM_KEYS = {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
NODE_KEYS = {
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
}


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> AttributionGraph:
    manager = ModelManager(make_settings(tmp_path_factory.mktemp("graph-json")))
    handle = manager.get("tiny-llama")
    return attribute(handle, random_transcoders(handle, "clt", 11), PROMPT, max_feature_nodes=None)


@pytest.fixture(scope="module")
def document(graph: AttributionGraph) -> GraphFile:
    return to_graph_json(graph, slug="cats-sat", clerps={(0, 1): "feature one"})


def test_document_has_circuit_tracers_keys_and_ids(
    graph: AttributionGraph, document: GraphFile
) -> None:
    data = json.loads(document.model_dump_json())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert set(data["metadata"]) == METADATA_KEYS
    assert data["metadata"]["prompt"] == PROMPT and data["metadata"]["slug"] == "cats-sat"
    assert data["metadata"]["prompt_tokens"] == graph.token_strings
    assert set(data["qParams"]) == QPARAM_KEYS
    assert all(set(node) == NODE_KEYS for node in data["nodes"])
    assert all(set(link) == {"source", "target", "weight"} for link in data["links"])

    by_type: dict[str, list[dict]] = {}
    for node in data["nodes"]:
        by_type.setdefault(node["feature_type"], []).append(node)
    assert len(by_type["embedding"]) == graph.n_tokens
    assert len(by_type["logit"]) == graph.n_logits
    assert by_type["cross layer transcoder"] and by_type["mlp reconstruction error"]
    for node in by_type["embedding"]:
        token = int(graph.input_tokens[node["ctx_idx"]])
        assert node["node_id"] == f"E_{token}_{node['ctx_idx']}" and node["layer"] == "E"
    top = graph.n_layers + 1
    for k, node in enumerate(by_type["logit"]):
        token = int(graph.logit_tokens[k])
        assert node["node_id"] == f"{top}_{token}_{graph.target_position}"
        assert node["is_target_logit"] == (k == 0) and node["clerp"].startswith("Output ")
    for node in by_type["cross layer transcoder"]:
        layer, feature, position = (int(x) for x in node["node_id"].split("_"))
        assert node["layer"] == str(layer) and node["ctx_idx"] == position
        index = graph.feature_node(layer, position, feature)
        assert node["activation"] == pytest.approx(
            float(graph.activation_values[graph.selected_features[index]])
        )
        assert node["feature"] == (layer + feature) * (layer + feature + 1) // 2 + feature
        assert node["clerp"] == ("feature one" if (layer, feature) == (0, 1) else "")
    features = {node["node_id"] for node in by_type["cross layer transcoder"]}
    for node in by_type["mlp reconstruction error"]:
        plain = f"0_{node['layer']}_{node['ctx_idx']}"
        # circuit-tracer's ids collide for layer-0 feature f and layer f's error node.
        assert node["node_id"] == (plain + "_err" if plain in features else plain)
        assert node["feature"] == -1
    assert any(node["node_id"].endswith("_err") for node in by_type["mlp reconstruction error"])


def test_links_are_the_kept_edges(graph: AttributionGraph, document: GraphFile) -> None:
    pruned = prune(graph)
    index = {}
    for n in pruned.node_mask.nonzero().squeeze(1).tolist():
        info = graph.describe(n)
        if info["kind"] == "feature":
            index[f"{info['layer']}_{info['feature']}_{info['position']}"] = n
        elif info["kind"] == "error":
            plain = f"0_{info['layer']}_{info['position']}"
            index[plain + "_err" if plain in index else plain] = n
        elif info["kind"] == "token":
            index[f"E_{info['token']}_{info['position']}"] = n
        else:
            index[f"{graph.n_layers + 1}_{info['token']}_{info['position']}"] = n
    assert len(document.links) == int(pruned.edge_mask.sum())
    for link in document.links:
        target, source = index[link.target], index[link.source]
        assert pruned.edge_mask[target, source]
        assert link.weight == pytest.approx(float(graph.adjacency_matrix[target, source]))


def test_write_and_read_back(tmp_path: Path, graph: AttributionGraph, document: GraphFile) -> None:
    path = write_graph_json(graph, tmp_path, slug="cats-sat", clerps={(0, 1): "feature one"})
    assert path == tmp_path / "cats-sat.json"
    write_graph_json(graph, tmp_path, slug="cats-sat", node_threshold=0.5)
    write_graph_json(graph, tmp_path, slug="other")
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in listing["graphs"]) == ["cats-sat", "other"]

    again = read_graph_json(tmp_path / "other.json")
    assert again == to_graph_json(graph, slug="other")
    assert read_graph_json(document.model_dump_json()) == document
    assert read_graph_json(json.loads(document.model_dump_json())) == document
    ids, matrix = document.adjacency()
    assert len(ids) == len(document.nodes) and int((matrix != 0).sum()) <= len(document.links)
    link = document.links[0]
    assert matrix[ids.index(link.target), ids.index(link.source)] == pytest.approx(link.weight)
    logit = next(n for n in document.nodes if n.feature_type == "logit")
    assert logit.coordinates()["kind"] == "logit"
    assert document.node(logit.node_id) is logit


def test_minimal_circuit_tracer_node_reads(document: GraphFile) -> None:
    """Optional fields take circuit-tracer's defaults (jsNodeId: the node id)."""
    data = json.loads(document.model_dump_json())
    data["nodes"] = [
        {k: node[k] for k in ("node_id", "feature", "layer", "ctx_idx", "feature_type")}
        for node in data["nodes"]
    ]
    data["nodes"][0]["extra"] = "ignored"
    read = read_graph_json(data)
    assert read.nodes[0].jsNodeId == read.nodes[0].node_id and read.nodes[0].clerp == ""


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("links"), "missing links"),
        (lambda d: d["nodes"][0].pop("node_id"), "nodes.0.node_id"),
        (lambda d: d["nodes"][0].update(ctx_idx="first"), "nodes.0.ctx_idx"),
        (lambda d: d.update(nodes={"not": "a list"}), "nodes"),
        (lambda d: d["links"][0].update(target="nowhere"), "'nowhere'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "appear twice"),
        (lambda d: d["metadata"].pop("scan"), "metadata.scan"),
        (lambda d: d["links"][0].update(weight=float("inf")), "links.0.weight"),
    ],
)
def test_malformed_documents_are_refused(document: GraphFile, mutate, message: str) -> None:
    data = json.loads(document.model_dump_json())
    mutate(data)
    with pytest.raises(GraphJSONError, match=message):
        read_graph_json(data)


def test_unreadable_sources_are_refused(tmp_path: Path, graph: AttributionGraph) -> None:
    with pytest.raises(GraphJSONError, match="not valid JSON"):
        read_graph_json('{"metadata": ')
    with pytest.raises(GraphJSONError, match="not valid JSON"):
        read_graph_json('{"links": [{"weight": NaN}]}')
    with pytest.raises(GraphJSONError, match="Cannot read graph file"):
        read_graph_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(GraphJSONError, match="got list"):
        read_graph_json(tmp_path / "list.json")
    with pytest.raises(GraphJSONError, match="Slug"):
        to_graph_json(graph, slug="../escape")
    with pytest.raises(ValueError, match="threshold"):
        to_graph_json(graph, slug="ok", node_threshold=2.0)
    assert torch.is_tensor(graph.adjacency_matrix)
