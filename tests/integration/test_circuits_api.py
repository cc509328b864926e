"""Attribution graphs over REST and as pages, on tiny-llama with random transcoders saved in
circuit-tracer's format: stored graphs equal a direct ``attribute`` + ``prune``, exports
read back as circuit-tracer graph JSON, views restore, dashboards and interventions equal
the library's, access follows the attention explorer's rules, and every bad request gets
a clear status and sentence."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tzoo_testing import make_settings, signed_up

from tzoo.analyses.corpus import shipped_corpus
from tzoo.circuits.attribution import attribute
from tzoo.circuits.features import build_dashboards
from tzoo.circuits.graph_json import GraphFile, read_graph_json, to_graph_json
from tzoo.circuits.interventions import FeatureIntervention, intervene
from tzoo.circuits.io import load_transcoders, save_transcoders
from tzoo.circuits.replacement import build_replacement, stack_of
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.runtime.handle import ModelHandle
from tzoo.service.circuits import DASHBOARD_OPTIONS, LOADED_TRANSCODERS, find_transcoder_set
from tzoo.store.artefacts import get_artefact, list_artefacts, load_arrays
from tzoo.web.app import create_app
from tzoo.web.tools import TOOLS

MODEL = "tiny-llama"
SET_ID = "tiny-llama/plt-jumprelu-32f-L0-1"
PROMPT = "Cats sat on it."  # byte-level tokenizer: one token a character, BOS first
MAX_NODES = 40  # a capped graph: attribution ranks features by influence as it goes
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'


def random_transcoders(
    handle: ModelHandle, *, seed: int, n_features: int = 32, low_features: float | None = -10.0
) -> TranscoderSet:
    """Per-layer JumpReLU transcoders whose features fire on a fair share of tokens:
    random encoders, biases and thresholds (a trained set would need minutes).

    ``low_features``: the encoder bias of layer 0's features 0..n_layers-1, whose
    circuit-tracer ids can equal an error node's (see ``tzoo.circuits.graph_json``):
    -10 keeps them silent, so ids compare with ``to_graph_json``'s at every threshold
    (it renames per threshold; a stored graph keeps the ids of its stored thresholds)."""
    config = TranscoderConfig(
        model_name=handle.name,
        kind="plt",
        d_model=handle.d_model,
        n_features=n_features,
        layers=tuple(range(handle.n_layers)),
        n_model_layers=handle.n_layers,
        stack=stack_of(handle),
    )
    transcoders = TranscoderSet(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    d = handle.d_model
    with torch.no_grad():
        for i in range(handle.n_layers):
            transcoders.W_enc[i].copy_(torch.randn(d, n_features, generator=g) / math.sqrt(d))
            transcoders.b_enc[i].copy_(torch.randn(n_features, generator=g) * 0.3)
            transcoders.threshold[i].copy_(torch.rand(n_features, generator=g) + 1.0)
            transcoders.b_dec[i].copy_(torch.randn(d, generator=g) * 0.1)
        if low_features is not None:
            transcoders.b_enc[0][: handle.n_layers] = low_features
    return transcoders


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("circuits")


@pytest.fixture(scope="module")
def app(root: Path) -> Iterator[FastAPI]:
    LOADED_TRANSCODERS.clear()
    settings = make_settings(root, transcoders_dir=root / "transcoders")
    app = create_app(settings)
    handle = app.state.manager.get(MODEL)
    save_transcoders(random_transcoders(handle, seed=0), root / "transcoders" / SET_ID)
    with TestClient(app):
        yield app
    LOADED_TRANSCODERS.clear()


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    # No `with`: the module's app is already started, and a nested lifespan would unload
    # every model when it ends.
    return TestClient(app)


@pytest.fixture
def handle(app: FastAPI) -> ModelHandle:
    return app.state.manager.get(MODEL)


@pytest.fixture(scope="module")
def transcoders(root: Path, app: FastAPI) -> TranscoderSet:
    return load_transcoders(root / "transcoders" / SET_ID, handle=app.state.manager.get(MODEL))


def create(client: TestClient, **body: Any) -> dict[str, str]:
    request = {
        "model_name": MODEL,
        "transcoders": SET_ID,
        "prompt": PROMPT,
        "max_feature_nodes": MAX_NODES,
        **body,
    }
    response = client.post("/api/graphs", json=request)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def graph_slug(app: FastAPI) -> str:
    return create(TestClient(app))["slug"]


@pytest.fixture(scope="module")
def direct(app: FastAPI, transcoders: TranscoderSet) -> Any:
    """The graph the API should have stored, computed here."""
    handle = app.state.manager.get(MODEL)
    return attribute(handle, transcoders, PROMPT, max_feature_nodes=MAX_NODES)


def assert_same_graph(found: GraphFile, expected: GraphFile) -> None:
    """Same nodes (ids, every field; float32 values exact) and links (ends; weights to
    float16 precision, as stored)."""
    assert [n.node_id for n in found.nodes] == [n.node_id for n in expected.nodes]
    for a, b in zip(found.nodes, expected.nodes, strict=True):
        assert a.model_dump() == b.model_dump()
    assert [(x.source, x.target) for x in found.links] == [
        (x.source, x.target) for x in expected.links
    ]
    np.testing.assert_allclose(
        [x.weight for x in found.links], [x.weight for x in expected.links], rtol=1e-3, atol=1e-7
    )


# -- transcoder sets ------------------------------------------------------------------------------


def test_transcoder_sets_are_listed_per_model(client: TestClient) -> None:
    listing = client.get("/api/transcoders").json()
    (llama,) = [m for m in listing["models"] if m["model_name"] == MODEL]
    (found,) = llama["sets"]
    assert found["id"] == SET_ID and found["kind"] == "plt" and found["activation"] == "jumprelu"
    assert found["layers"] == [0, 1] and found["n_features"] == 32
    assert "path" not in found  # server folders stay on the server
    other = client.get("/api/transcoders", params={"model": "tiny-gpt2"}).json()
    assert other["models"] == [{"model_name": "tiny-gpt2", "sets": []}]
    assert other["train_command"] == "tzoo transcoders train --model tiny-gpt2"
    missing = client.get("/api/transcoders", params={"model": "gpt-17"})
    assert missing.status_code == 404 and "gpt-17" in missing.json()["detail"]


# -- graphs ---------------------------------------------------------------------------------------


def test_stored_graph_equals_a_direct_attribution_and_prune(
    client: TestClient, app: FastAPI, graph_slug: str, direct: Any
) -> None:
    document = client.get(f"/api/graphs/{graph_slug}").json()
    expected = to_graph_json(direct, slug=graph_slug, node_threshold=0.8, edge_threshold=0.98)
    assert_same_graph(read_graph_json(document), expected)
    info = document["tzoo"]
    assert info["prompt"] == PROMPT and info["prompt_tokens"] == direct.token_strings
    assert info["target_position"] == direct.n_tokens - 1
    assert info["logit_strings"] == direct.logit_strings
    np.testing.assert_allclose(info["logit_probabilities"], direct.logit_probabilities.numpy())
    assert info["n_feature_nodes"] == MAX_NODES == direct.n_features
    assert info["transcoders"]["id"] == SET_ID and "fingerprint" not in info["transcoders"]
    assert 0 <= info["scores"]["replacement"] <= 1 and 0 <= info["scores"]["completeness"] <= 1
    assert document["qParams"]["pinnedIds"] == [] and info["view"] is None
    # The page re-thresholds from shares it gets with every node and link.
    assert all("share" in n["tzoo"] for n in document["nodes"])
    assert all("share" in link for link in document["links"])
    # Stored compactly: float16 weights and a small blob, nothing dense.
    with app.state.session_factory() as session:
        artefact = get_artefact(session, graph_slug)
        assert artefact is not None and artefact.kind == "graph"
        arrays = load_arrays(artefact)
        assert arrays["edge_weight"].dtype == np.float16
        assert len(arrays["edge_weight"]) == len(expected.links)
        assert artefact.blob_bytes < 16 * len(expected.links) + 4096


@pytest.mark.parametrize(("node_t", "edge_t"), [(0.5, 0.9), (0.3, 0.6), (0.8, 0.4), (0.0, 0.0)])
def test_lower_thresholds_equal_pruning_the_whole_graph(
    client: TestClient, graph_slug: str, direct: Any, node_t: float, edge_t: float
) -> None:
    """The stored shares re-threshold exactly: what the export (and the page) keeps at
    lower thresholds is what prune keeps on the unpruned graph."""
    response = client.get(
        f"/api/graphs/{graph_slug}/export",
        params={"node_threshold": node_t, "edge_threshold": edge_t},
    )
    expected = to_graph_json(direct, slug=graph_slug, node_threshold=node_t, edge_threshold=edge_t)
    found = read_graph_json(response.text)
    assert_same_graph(found, expected)
    assert found.metadata.node_threshold == node_t


def test_export_is_a_circuit_tracer_graph_file(client: TestClient, graph_slug: str) -> None:
    response = client.get(f"/api/graphs/{graph_slug}/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert (
        response.headers["content-disposition"]
        == f'attachment; filename="tzoo-graph-{graph_slug}.json"'
    )
    data = json.loads(response.text)
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert all("tzoo" not in node for node in data["nodes"])  # only circuit-tracer's keys
    assert all(set(link) == {"source", "target", "weight"} for link in data["links"])
    graph = read_graph_json(response.text)
    assert graph.metadata.slug == graph_slug and graph.metadata.prompt == PROMPT
    assert graph.metadata.transcoder_list == [SET_ID]
    assert graph.metadata.schema_version == 1
    assert graph.qParams.model_dump() == {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    kinds = {n.feature_type for n in graph.nodes}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert sum(n.is_target_logit for n in graph.nodes) == 1


def test_public_graphs_are_listed_and_searchable(client: TestClient, graph_slug: str) -> None:
    listed = client.get("/api/graphs", params={"model": MODEL}).json()
    mine = [g for g in listed if g["slug"] == graph_slug]
    assert mine and mine[0]["prompt"] == PROMPT and mine[0]["transcoders"] == SET_ID
    assert mine[0]["url"].endswith(f"/graph/{graph_slug}")
    assert client.get("/api/graphs", params={"q": "no such prompt"}).json() == []


def test_ids_stay_unique_where_circuit_tracer_s_would_collide(
    client: TestClient, root: Path, handle: ModelHandle
) -> None:
    """Layer 0's feature 1 and layer 1's error node at one position share circuit-tracer's
    id ``0_1_{position}``; the graph keeps graph_json's way of telling them apart (the
    error node's id gets ``_err``), so the export equals ``to_graph_json``, reads back,
    and a view can pin both."""
    hot = "tiny-llama/hot-low-features"
    loud = random_transcoders(handle, seed=0, low_features=4.0)
    save_transcoders(loud, root / "transcoders" / hot)
    slug = create(client, transcoders=hot, prompt="Hi there.")["slug"]
    nodes = client.get(f"/api/graphs/{slug}").json()["nodes"]
    ids = [n["node_id"] for n in nodes]
    assert len(ids) == len(set(ids))
    renamed = [n for n in nodes if n["node_id"].endswith("_err")]
    assert renamed, "the set was made to collide"
    for node in renamed:
        layer, position = node["tzoo"]["layer"], node["tzoo"]["position"]
        assert node["node_id"] == f"0_{layer}_{position}_err"
        assert node["feature_type"] == "mlp reconstruction error"
        assert f"0_{layer}_{position}" in ids  # the layer-0 feature keeps its id
    exported = read_graph_json(client.get(f"/api/graphs/{slug}/export").text)
    direct = attribute(
        handle,
        load_transcoders(root / "transcoders" / hot),
        "Hi there.",
        max_feature_nodes=MAX_NODES,
    )
    assert_same_graph(exported, to_graph_json(direct, slug=slug))
    pins = [renamed[0]["node_id"], renamed[0]["node_id"].removesuffix("_err")]
    view = {"pinned": pins, "node_threshold": 0.8, "edge_threshold": 0.98}
    assert client.post(f"/api/graphs/{slug}/views", json=view).status_code == 201


# -- views ----------------------------------------------------------------------------------------


def node_ids(client: TestClient, slug: str) -> dict[str, list[str]]:
    nodes = client.get(f"/api/graphs/{slug}").json()["nodes"]
    by_kind: dict[str, list[str]] = {}
    for node in nodes:
        by_kind.setdefault(node["tzoo"]["kind"], []).append(node["node_id"])
    return by_kind


def test_views_round_trip_and_their_permalink_restores_them(
    client: TestClient, graph_slug: str, direct: Any
) -> None:
    ids = node_ids(client, graph_slug)
    features, errors = ids["feature"], ids["error"]
    view = {
        "pinned": [features[0], features[1], errors[0]],
        "supernodes": [{"name": "say “it” <b>", "nodes": [features[0], features[1]]}],
        "node_threshold": 0.6,
        "edge_threshold": 0.9,
        "selected": features[0],
    }
    response = client.post(f"/api/graphs/{graph_slug}/views", json=view)
    assert response.status_code == 201, response.text
    created = response.json()
    view_id = created["view_id"]
    assert created["url"].endswith(f"/graph/{graph_slug}?view={view_id}")
    assert client.get(f"/api/graphs/{graph_slug}/views/{view_id}").json() == {
        "id": view_id,
        **view,
    }
    restored = client.get(f"/api/graphs/{graph_slug}", params={"view": view_id}).json()
    assert restored["tzoo"]["view"] == {"id": view_id, **view}
    assert restored["qParams"] == {
        "pinnedIds": view["pinned"],
        "supernodes": [["say “it” <b>", features[0], features[1]]],
        "linkType": "both",
        "clickedId": features[0],
        "sg_pos": "",
    }
    # The permalink's page carries the view; its export is pruned at the view's thresholds.
    page = client.get(f"/graph/{graph_slug}", params={"view": view_id})
    assert page.status_code == 200 and f'"view": "{view_id}"' in page.text
    exported = read_graph_json(
        client.get(f"/api/graphs/{graph_slug}/export", params={"view": view_id}).text
    )
    expected = to_graph_json(direct, slug=graph_slug, node_threshold=0.6, edge_threshold=0.9)
    assert_same_graph(exported, expected)
    assert exported.qParams.pinnedIds == view["pinned"]


def test_bad_views_are_refused(client: TestClient, graph_slug: str, app: FastAPI) -> None:
    url = f"/api/graphs/{graph_slug}/views"
    base = {"node_threshold": 0.5, "edge_threshold": 0.5}
    unknown = client.post(url, json={**base, "pinned": ["9_999_99"]})
    assert unknown.status_code == 422 and "9_999_99" in unknown.json()["detail"]
    assert client.post(url, json={**base, "selected": "nope"}).status_code == 422
    assert client.post(url, json={"node_threshold": 1.5, "edge_threshold": 0.5}).status_code == 422
    assert (
        client.post(url, json={**base, "supernodes": [{"name": "x", "nodes": []}]}).status_code
        == 422
    )
    assert client.post(url, json={**base, "colour": "red"}).status_code == 422
    # An unknown view, and a view of another graph, are 404s.
    assert client.get(f"/api/graphs/{graph_slug}", params={"view": "nope"}).status_code == 404
    assert client.get(f"/graph/{graph_slug}", params={"view": "nope"}).status_code == 404
    other = create(client, prompt="Dogs ran.")["slug"]
    view_id = client.post(f"/api/graphs/{other}/views", json=base).json()["view_id"]
    response = client.get(f"/api/graphs/{graph_slug}", params={"view": view_id})
    assert response.status_code == 404 and "view" in response.json()["detail"]
    # A view's slug is no graph.
    assert client.get(f"/api/graphs/{view_id}").status_code == 404


# -- dashboards and interventions -----------------------------------------------------------------


def first_feature(client: TestClient, slug: str) -> dict[str, Any]:
    nodes = client.get(f"/api/graphs/{slug}").json()["nodes"]
    return next(n["tzoo"] for n in nodes if n["tzoo"]["kind"] == "feature")


def test_dashboard_equals_build_dashboards_for_that_feature(
    client: TestClient, app: FastAPI, graph_slug: str, handle: ModelHandle, transcoders: Any
) -> None:
    node = first_feature(client, graph_slug)
    layer, feature = node["layer"], node["feature"]
    url = f"/api/graphs/{graph_slug}/features/{layer}/{feature}"
    response = client.get(url)
    assert response.status_code == 200, response.text
    expected = build_dashboards(
        handle, transcoders, shipped_corpus(), features={layer: [feature]}, **DASHBOARD_OPTIONS
    )[(layer, feature)]
    got = response.json()
    slug, source = got.pop("slug"), got.pop("source")
    assert got == json.loads(json.dumps(expected.to_dict()))
    assert got["n_active"] > 0 and got["top_contexts"]
    assert source["transcoders"] == SET_ID and source["corpus"] == "shipped"
    # Stored once as an artefact, compactly: the second request finds it, nothing new is
    # stored, and the permalink gives the same dashboard.
    with app.state.session_factory() as session:
        stored = get_artefact(session, slug)
        assert stored is not None and stored.kind == "feature_dashboard"
        assert stored.blob_bytes < len(json.dumps(got)) / 2
        before = len(list_artefacts(session, kind="feature_dashboard"))
    assert client.get(url).json() == response.json()
    with app.state.session_factory() as session:
        assert len(list_artefacts(session, kind="feature_dashboard")) == before
    permalink = client.get(f"/api/features/{slug}")
    assert permalink.status_code == 200 and permalink.json() == response.json()
    page = client.get(f"/features/{slug}")
    assert page.status_code == 200 and f"Feature L{layer} #{feature}" in page.text
    assert client.get("/api/features/nope").status_code == 404
    assert client.get(f"/features/{graph_slug}").status_code == 404  # a graph, not a dashboard
    # Features the set does not have.
    missing = client.get(f"/api/graphs/{graph_slug}/features/5/0")
    assert missing.status_code == 404 and "layer 5" in missing.json()["detail"]
    assert client.get(f"/api/graphs/{graph_slug}/features/0/32").status_code == 404
    assert client.get("/api/graphs/nope/features/0/1").status_code == 404


@pytest.mark.parametrize(
    ("change", "mode"),
    [({"scale": 0.0}, "frozen"), ({"scale": 3.0}, "direct"), ({"value": 5.0}, "live")],
)
def test_interventions_equal_intervene(
    client: TestClient,
    graph_slug: str,
    handle: ModelHandle,
    transcoders: Any,
    change: dict[str, float],
    mode: str,
) -> None:
    node = first_feature(client, graph_slug)
    item = {"layer": node["layer"], "position": node["position"], "feature": node["feature"]}
    response = client.post(
        f"/api/graphs/{graph_slug}/interventions",
        json={"interventions": [{**item, **change}], "mode": mode},
    )
    assert response.status_code == 200, response.text
    found = response.json()
    replacement = build_replacement(handle, transcoders, PROMPT)
    layer, position, feature = item["layer"], item["position"], item["feature"]
    intervention = (
        FeatureIntervention.scale(layer, position, feature, change["scale"])
        if "scale" in change
        else FeatureIntervention.set(layer, position, feature, change["value"])
    )
    expected = intervene(replacement, [intervention], mode=mode, position=-1, top_k=10)  # type: ignore[arg-type]
    assert found["mode"] == mode and found["position"] == expected.position
    for side in ("top_before", "top_after"):
        result = getattr(expected, side)
        assert [t["token_id"] for t in found[side]] == [t.token_id for t in result]
        np.testing.assert_allclose(
            [t["probability"] for t in found[side]], [t.probability for t in result], atol=1e-6
        )
    assert found["top_before"] != found["top_after"] or change.get("scale") == 1.0
    (tracked, *_) = found["graph_logits"]
    position = expected.position
    token = tracked["token_id"]
    assert tracked["logit_after"] == pytest.approx(
        float(expected.logits_after[position, token]), abs=1e-5
    )


def test_bad_interventions_are_refused(client: TestClient, graph_slug: str) -> None:
    url = f"/api/graphs/{graph_slug}/interventions"
    item = {"layer": 0, "position": 3, "feature": 1}
    both = client.post(url, json={"interventions": [{**item, "scale": 1, "value": 2}]})
    assert both.status_code == 422 and "either a scale or a value" in both.json()["detail"]
    assert client.post(url, json={"interventions": [item]}).status_code == 422
    assert client.post(url, json={"interventions": []}).status_code == 422
    far = client.post(url, json={"interventions": [{**item, "position": 99, "scale": 0}]})
    assert far.status_code == 422 and "outside the prompt" in far.json()["detail"]
    deep = client.post(url, json={"interventions": [{**item, "layer": 4, "scale": 0}]})
    assert deep.status_code == 404 and "layer 4" in deep.json()["detail"]
    mode = client.post(url, json={"interventions": [{**item, "scale": 0}], "mode": "magic"})
    assert mode.status_code == 422


def test_retrained_transcoders_make_a_graph_s_features_stale(
    client: TestClient, root: Path, handle: ModelHandle
) -> None:
    other = "tiny-llama/retrained"
    save_transcoders(random_transcoders(handle, seed=3), root / "transcoders" / other)
    slug = create(client, transcoders=other, prompt="Hi.")["slug"]
    node = first_feature(client, slug)
    url = f"/api/graphs/{slug}/features/{node['layer']}/{node['feature']}"
    assert client.get(url).status_code == 200
    save_transcoders(random_transcoders(handle, seed=4), root / "transcoders" / other)
    stale = client.get(url)
    assert stale.status_code == 409 and "retrained" in stale.json()["detail"]
    body = {"interventions": [{"layer": 0, "position": 1, "feature": 0, "scale": 0}]}
    assert client.post(f"/api/graphs/{slug}/interventions", json=body).status_code == 409
    # The graph itself is stored and still opens.
    assert client.get(f"/api/graphs/{slug}").status_code == 200


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"model_name": "gpt-17"}, 404, "Unknown model 'gpt-17'"),
        ({"model_name": "tiny-gpt2"}, 409, "`tzoo transcoders train --model tiny-gpt2`"),
        ({"transcoders": "tiny-llama/nope"}, 404, SET_ID),
        ({"transcoders": "../../etc"}, 404, "No transcoder set"),
        ({"prompt": "x" * 300}, 413, "the limit is 256"),
        ({"target_position": 40}, 422, "outside the prompt"),
        ({"target_position": -17}, 422, "outside the prompt"),
        ({"model_name": "tiny-t5"}, 422, "encoder-decoder"),
        ({"prompt": "   "}, 422, "empty"),
        ({"prompt": ""}, 422, "prompt"),
        ({"node_threshold": 1.5}, 422, "node_threshold"),
        ({"max_feature_nodes": -1}, 422, "max_feature_nodes"),
        ({"visibility": "private"}, 401, "Log in"),
    ],
)
def test_bad_graph_requests_get_clear_errors(
    client: TestClient, body: dict[str, Any], status: int, detail: str
) -> None:
    response = client.post(
        "/api/graphs", json={"model_name": MODEL, "transcoders": SET_ID, "prompt": PROMPT, **body}
    )
    assert response.status_code == status, response.text
    assert detail in json.dumps(response.json()["detail"], ensure_ascii=False).replace('\\"', '"')


def test_an_encoder_s_graph_is_read_at_its_mask(
    client: TestClient, app: FastAPI, root: Path
) -> None:
    """A masked-LM's graph: the default target is the mask, any other position can be
    asked for, a prompt without a mask gets a sentence, and a bare encoder (no head) too."""
    manager = app.state.manager
    for name in ("tiny-bert-mlm", "tiny-bert"):
        encoder = random_transcoders(manager.get(name), seed=2, low_features=None)
        save_transcoders(encoder, root / "transcoders" / name / "plt-jumprelu-32f-L0-1")
    body = {"model_name": "tiny-bert-mlm", "prompt": "Cats [MASK] on it.", "max_feature_nodes": 30}
    created = client.post("/api/graphs", json=body)
    assert created.status_code == 201, created.text
    info = client.get(f"/api/graphs/{created.json()['slug']}").json()["tzoo"]
    assert info["prompt_tokens"][info["target_position"]] == "[MASK]"
    handle = manager.get("tiny-bert-mlm")
    expected = attribute(
        handle,
        LOADED_TRANSCODERS.get(
            find_transcoder_set(app.state.settings, "tiny-bert-mlm", None), handle
        ),
        body["prompt"],
        max_feature_nodes=30,
    )
    assert info["target_position"] == expected.target_position == 6  # [CLS] C a t s ␣ [MASK]
    assert info["logit_strings"] == expected.logit_strings
    at_two = client.post("/api/graphs", json={**body, "target_position": 2})
    assert at_two.status_code == 201, at_two.text
    assert client.get(f"/api/graphs/{at_two.json()['slug']}").json()["tzoo"]["target_position"] == 2
    no_mask = client.post("/api/graphs", json={**body, "prompt": "Cats sat."})
    assert no_mask.status_code == 422 and "[MASK]" in no_mask.json()["detail"]
    bare = client.post("/api/graphs", json={**body, "model_name": "tiny-bert"})
    assert bare.status_code == 422 and "masked-LM head" in bare.json()["detail"]


def test_unknown_graphs_are_404(client: TestClient) -> None:
    for path in ("/api/graphs/nope", "/api/graphs/nope/export", "/graph/nope"):
        response = client.get(path)
        assert response.status_code == 404
    assert client.get("/api/graphs/nope").json()["detail"] == "No attribution graph at this link."


def test_an_attention_visualization_is_no_graph(client: TestClient) -> None:
    slug = client.post(
        "/api/visualizations", json={"model_name": "tiny-gpt2", "text": "Hello"}
    ).json()["slug"]
    assert client.get(f"/api/graphs/{slug}").status_code == 404
    assert client.get(f"/graph/{slug}").status_code == 404


# -- access ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("cheap_passwords")
def test_private_graphs_are_404_for_everyone_but_the_owner(app: FastAPI) -> None:
    ada, bob, anonymous = TestClient(app), TestClient(app), TestClient(app)
    ada_csrf = signed_up(ada, "ada-graphs")
    bob_csrf = signed_up(bob, "bob-graphs")
    response = ada.post(
        "/api/graphs",
        json={
            "model_name": MODEL,
            "transcoders": SET_ID,
            "prompt": "secret plans",
            "visibility": "private",
            "max_feature_nodes": 10,
        },
        headers={"X-CSRF-Token": ada_csrf},
    )
    assert response.status_code == 201, response.text
    slug = response.json()["slug"]
    node = first_feature(ada, slug)
    paths = [
        f"/api/graphs/{slug}",
        f"/api/graphs/{slug}/export",
        f"/graph/{slug}",
        f"/api/graphs/{slug}/features/{node['layer']}/{node['feature']}",
    ]
    for path in paths:
        assert ada.get(path).status_code == 200, path
        assert bob.get(path).status_code == 404, path
        assert anonymous.get(path).status_code == 404, path
    assert slug not in {g["slug"] for g in anonymous.get("/api/graphs").json()}
    # Views of a private graph are private to its owner too.
    view = {"node_threshold": 0.5, "edge_threshold": 0.5}
    assert anonymous.post(f"/api/graphs/{slug}/views", json=view).status_code == 404
    created = ada.post(
        f"/api/graphs/{slug}/views", json=view, headers={"X-CSRF-Token": ada_csrf}
    ).json()
    assert ada.get(f"/graph/{slug}", params={"view": created["view_id"]}).status_code == 200
    interventions = {
        "interventions": [{**{k: node[k] for k in ("layer", "position", "feature")}, "scale": 0}]
    }
    assert (
        anonymous.post(f"/api/graphs/{slug}/interventions", json=interventions).status_code == 404
    )
    # Writes with the login cookie need the CSRF header.
    assert ada.post(f"/api/graphs/{slug}/views", json=view).status_code == 403
    # Only the owner changes visibility or deletes; others see 404, then 403.
    patch = {"visibility": "unlisted"}
    assert (
        bob.patch(f"/api/graphs/{slug}", json=patch, headers={"X-CSRF-Token": bob_csrf}).status_code
        == 404
    )
    assert (
        ada.patch(f"/api/graphs/{slug}", json=patch, headers={"X-CSRF-Token": ada_csrf}).status_code
        == 200
    )
    assert bob.get(f"/api/graphs/{slug}").status_code == 200
    assert slug not in {g["slug"] for g in anonymous.get("/api/graphs").json()}  # unlisted
    assert bob.delete(f"/api/graphs/{slug}", headers={"X-CSRF-Token": bob_csrf}).status_code == 403
    assert ada.delete(f"/api/graphs/{slug}", headers={"X-CSRF-Token": ada_csrf}).status_code == 204
    assert ada.get(f"/api/graphs/{slug}").status_code == 404
    # Its views went with it.
    assert ada.get(f"/api/graphs/{slug}/views/{created['view_id']}").status_code == 404
    with app.state.session_factory() as session:
        assert get_artefact(session, created["view_id"]) is None


@pytest.mark.usefixtures("cheap_passwords")
def test_comments_on_a_graph_reuse_the_annotations(app: FastAPI, graph_slug: str) -> None:
    ada = TestClient(app)
    csrf = signed_up(ada, "ada-comments")
    url = f"/api/visualizations/{graph_slug}/annotations"
    body = {"body": "This feature says “sat”.", "layer": 1, "token_start": 3, "token_end": 3}
    response = ada.post(url, json=body, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 201, response.text
    assert [c["body"] for c in ada.get(url).json()] == [body["body"]]
    outside = ada.post(url, json={**body, "layer": 2}, headers={"X-CSRF-Token": csrf})
    assert outside.status_code == 422 and "layer 2" in outside.json()["detail"]


# -- pages ----------------------------------------------------------------------------------------


def test_form_page_lists_models_and_sets(client: TestClient, graph_slug: str) -> None:
    page = client.get("/graph")
    assert page.status_code == 200
    assert '<option value="tiny-llama">' in page.text
    sets = json.loads(re.search(r'id="cg-sets">(.*?)</script>', page.text, re.S).group(1))  # type: ignore[union-attr]
    assert [s["id"] for s in sets[MODEL]] == sorted(s["id"] for s in sets[MODEL])
    assert SET_ID in [s["id"] for s in sets[MODEL]]
    assert f'href="/graph/{graph_slug}"' in page.text
    assert "No transcoders yet for" in page.text and "tiny-gpt2" in page.text
    assert {tool.key: tool.path for tool in TOOLS}["circuits"] == "/graph"  # the home page's card


def test_form_page_without_transcoders_says_how_to_train(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, transcoders_dir=tmp_path / "none"))
    with TestClient(app) as client:
        page = client.get("/graph")
        assert page.status_code == 200 and 'id="cg-no-transcoders"' in page.text
        assert "tzoo transcoders train --model smollm2-135m" in page.text
        response = client.post("/api/graphs", json={"model_name": MODEL, "prompt": PROMPT})
        assert response.status_code == 409
        assert "tzoo transcoders train --model tiny-llama" in response.json()["detail"]


def test_user_text_is_escaped_on_the_pages(client: TestClient) -> None:
    slug = create(client, prompt=f"Hi {XSS}", max_feature_nodes=5)["slug"]
    for path in (f"/graph/{slug}", "/graph"):
        text = client.get(path).text
        assert XSS not in text
        assert "<script>window.__pwned" not in text
    assert "Hi &lt;script&gt;window.__pwned=1&lt;/script&gt;" in client.get(f"/graph/{slug}").text
    assert client.get(f"/api/graphs/{slug}").json()["tzoo"]["prompt"] == f"Hi {XSS}"
