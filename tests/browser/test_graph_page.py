"""The attribution graph page in a real browser, against a real server holding random
transcoders for tiny-llama: it draws the stored nodes and links, the threshold sliders
re-prune exactly as the server does, a click opens a node's dashboard, pins and
supernodes survive a saved view's permalink, the export downloads circuit-tracer JSON,
interventions show, user text stays inert, and nothing is requested from elsewhere."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tzoo_testing import run_server

pytestmark = pytest.mark.browser

MODEL = "tiny-llama"
SET_ID = "tiny-llama/plt-test"
PROMPT = "Cats sat on it."
XSS = "<img src=x onerror=window.__pwned=1>"


def _save_random_transcoders(directory: Path, root: Path) -> None:
    """Random per-layer transcoders for tiny-llama whose features fire (layer 0's
    features 0 and 1 kept silent: see tests/integration/test_circuits_api.py)."""
    from tzoo_testing import make_settings

    from tzoo.circuits.io import save_transcoders
    from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
    from tzoo.runtime.manager import ModelManager

    handle = ModelManager(make_settings(root)).get(MODEL)
    n, d = 32, handle.d_model
    config = TranscoderConfig(
        model_name=MODEL,
        kind="plt",
        d_model=d,
        n_features=n,
        layers=(0, 1),
        n_model_layers=handle.n_layers,
    )
    transcoders = TranscoderSet(config, seed=0)
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        for i in range(2):
            transcoders.W_enc[i].copy_(torch.randn(d, n, generator=g) / math.sqrt(d))
            transcoders.b_enc[i].copy_(torch.randn(n, generator=g) * 0.3)
            transcoders.threshold[i].copy_(torch.rand(n, generator=g) + 1.0)
        transcoders.b_enc[0][:2] = -10.0
    save_transcoders(transcoders, directory)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose transcoders folder holds one random set for tiny-llama."""
    root = tmp_path_factory.mktemp("graph-server")
    _save_random_transcoders(root / "transcoders" / SET_ID, root / "builder")
    with run_server(root, {"TZOO_TRANSCODERS_DIR": str(root / "transcoders")}) as url:
        yield url


def create_graph(server: str, prompt: str = PROMPT) -> str:
    body = {"model_name": MODEL, "transcoders": SET_ID, "prompt": prompt, "max_feature_nodes": 40}
    response = httpx.post(f"{server}/api/graphs", json=body, timeout=120)
    assert response.status_code == 201, response.text
    return str(response.json()["slug"])


@pytest.fixture(scope="module")
def slug(server: str) -> str:
    return create_graph(server)


@pytest.fixture(scope="module")
def document(server: str, slug: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{server}/api/graphs/{slug}").json()
    return data


def open_graph(page: Any, server: str, slug: str, query: str = "") -> None:
    page.goto(f"{server}/graph/{slug}{query}")
    page.wait_for_selector("#tzoo-graph[data-ready=true]")


def assert_local(page: Any, server: str) -> None:
    assert page.requests, "the page made no request at all?"
    for url in page.requests:
        assert url.startswith(server) or url.split(":", 1)[0] in {"data", "blob"}, url


def set_slider(page: Any, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', { bubbles: true })); }",
        str(value),
    )


def test_page_draws_every_stored_node_and_link(
    page: Any, server: str, slug: str, document: dict[str, Any]
) -> None:
    open_graph(page, server, slug)
    assert page.locator(".cg-node").count() == len(document["nodes"])
    assert page.locator(".cg-link").count() == len(document["links"])
    for kind in ("feature", "error", "token", "logit"):
        expected = sum(n["tzoo"]["kind"] == kind for n in document["nodes"])
        assert page.locator(f".cg-node.kind-{kind}").count() == expected > 0
    signs = {link["weight"] >= 0 for link in document["links"]}
    assert page.locator(".cg-link.positive").count() == sum(
        link["weight"] >= 0 for link in document["links"]
    )
    assert signs == {True, False}  # both colours show
    # Embeddings at the bottom, logits at the top, token positions left to right.
    box = {
        kind: page.locator(f".cg-node.kind-{kind}").first.bounding_box()
        for kind in ("token", "logit")
    }
    assert box["token"]["y"] > box["logit"]["y"]
    tokens = page.locator(".cg-token-label").all_text_contents()
    assert len(tokens) == document["tzoo"]["n_tokens"] and tokens[1] == "C"
    assert (
        page.locator("#cg-counts")
        .text_content()
        .startswith(f"{len(document['nodes'])} of {len(document['nodes'])} nodes")
    )
    assert_local(page, server)


def test_threshold_sliders_prune_as_the_server_does(
    page: Any, server: str, slug: str, document: dict[str, Any]
) -> None:
    open_graph(page, server, slug)
    before = page.locator(".cg-link").count()
    for node_t, edge_t in [(0.8, 0.5), (0.5, 0.5), (0.3, 0.9)]:
        set_slider(page, "#cg-node-slider", node_t)
        set_slider(page, "#cg-edge-slider", edge_t)
        expected = httpx.get(
            f"{server}/api/graphs/{slug}/export",
            params={"node_threshold": node_t, "edge_threshold": edge_t},
        ).json()
        assert page.locator(".cg-link").count() == len(expected["links"])
        assert page.locator(".cg-node").count() == len(expected["nodes"])
        shown = set(page.eval_on_selector_all(".cg-node", "els => els.map(e => e.dataset.id)"))
        assert shown == {n["node_id"] for n in expected["nodes"]}
        assert len(expected["links"]) < before
    # Keyboard: the slider moves with the arrow keys and edges go.
    set_slider(page, "#cg-edge-slider", 0.98)
    set_slider(page, "#cg-node-slider", 0.8)
    full = page.locator(".cg-link").count()
    page.focus("#cg-edge-slider")
    for _ in range(30):
        page.keyboard.press("ArrowLeft")
    assert page.locator("#cg-edge-value").text_content() == "0.68"
    assert page.locator(".cg-link").count() < full


def test_clicking_a_node_opens_its_dashboard(
    page: Any, server: str, slug: str, document: dict[str, Any]
) -> None:
    open_graph(page, server, slug)
    node = page.locator(".cg-node.kind-feature").first
    node_id = node.get_attribute("data-id")
    node.click()
    info = next(n["tzoo"] for n in document["nodes"] if n["node_id"] == node_id)
    title = page.locator("#cg-node-title").text_content()
    assert title.startswith(f"Feature {info['feature']} · layer {info['layer']}")
    assert page.locator(f'.cg-node[data-id="{node_id}"]').get_attribute("aria-pressed") == "true"
    page.wait_for_selector("#cg-dashboard[data-state=ready]", timeout=60_000)
    dashboard = httpx.get(
        f"{server}/api/graphs/{slug}/features/{info['layer']}/{info['feature']}"
    ).json()
    assert page.locator("#cg-dashboard-body > div > .cg-contexts > .cg-context").count() == len(
        dashboard["top_contexts"]
    )
    first = dashboard["top_contexts"][0]
    spans = page.locator(".cg-contexts > .cg-context").first.locator(".cg-ctx-token")
    assert spans.count() == len(first["tokens"])
    assert page.locator(".cg-ctx-token[data-active=true]").count() > 0  # highlighted tokens
    assert page.locator(".cg-histogram-bar").count() == len(dashboard["histogram"]["counts"])
    assert page.locator(".cg-logit-list.top li").count() == len(dashboard["top_logits"])
    assert page.locator(".cg-logit-list.bottom li").count() == len(dashboard["bottom_logits"])
    link = page.locator("#cg-dashboard-body .cg-dashboard-link")
    assert link.get_attribute("href") == f"/features/{dashboard['slug']}"
    # The links listed are buttons that select the other end.
    page.locator("#cg-node-in .cg-link-button").first.click()
    assert page.locator("#cg-node-title").text_content() != title
    # Keyboard: Tab reaches the nodes, arrows move, Enter selects, Escape clears.
    page.locator(".cg-node").first.focus()
    page.keyboard.press("ArrowRight")
    focused = page.evaluate("document.activeElement.dataset.id")
    page.keyboard.press("Enter")
    assert page.locator(f'.cg-node[data-id="{focused}"]').get_attribute("aria-pressed") == "true"
    page.keyboard.press("Escape")
    assert page.locator("#cg-node-details").is_hidden()
    assert_local(page, server)

    # The dashboard was stored: its permalink opens a page of its own with the same numbers.
    page.goto(f"{server}/features/{dashboard['slug']}")
    page.wait_for_selector("section[data-state=ready]", timeout=30_000)
    assert page.locator("h1").text_content() == f"Feature L{info['layer']} #{info['feature']}"
    assert page.locator(".cg-contexts > .cg-context").count() == len(dashboard["top_contexts"])
    assert page.locator(".cg-histogram-bar").count() == len(dashboard["histogram"]["counts"])
    assert page.locator(".cg-dashboard-link").count() == 0  # no link to itself
    assert_local(page, server)


def test_pins_supernodes_and_a_saved_view_survive_the_permalink(
    page: Any, server: str, slug: str, document: dict[str, Any]
) -> None:
    open_graph(page, server, slug)
    # The two most influential features: still shown at the lower threshold below.
    ranked = sorted(
        (n for n in document["nodes"] if n["tzoo"]["kind"] == "feature"),
        key=lambda n: n["tzoo"]["share"],
    )
    first, second = ranked[0]["node_id"], ranked[1]["node_id"]
    page.click(f'.cg-node[data-id="{first}"]')
    page.click("#cg-pin")
    page.focus(f'.cg-node[data-id="{second}"]')
    page.keyboard.press("p")  # pin from the keyboard
    assert page.locator(".cg-node.is-pinned").count() == 2
    assert page.locator("#cg-pinned li").count() == 2
    name = "say “sat” <b>bold</b>"
    page.check(f'#cg-pinned input[data-id="{first}"]')
    page.check(f'#cg-pinned input[data-id="{second}"]')
    page.fill("#cg-group-name", name)
    page.click("#cg-group")
    assert page.locator("#cg-supernodes .cg-supernode-name").text_content() == name
    assert page.locator(".cg-node.in-supernode").count() == 2
    set_slider(page, "#cg-node-slider", 0.6)
    page.click("#cg-save-view")
    page.wait_for_selector("#cg-permalink-box:not([hidden])")
    permalink = page.locator("#cg-permalink").get_attribute("href")
    view_id = permalink.rsplit("view=", 1)[1]
    assert permalink.endswith(f"/graph/{slug}?view={view_id}")
    assert page.evaluate("location.search") == f"?view={view_id}"

    page.goto(permalink)
    page.wait_for_selector("#tzoo-graph[data-ready=true]")
    assert page.locator("#cg-pinned li").count() == 2
    assert page.locator("#cg-supernodes .cg-supernode-name").text_content() == name
    assert page.locator("#cg-supernodes b").count() == 0  # the name is text, not markup
    assert page.locator("#cg-node-slider").input_value() == "0.6"
    assert page.locator("#cg-node-value").text_content() == "0.6"
    assert page.locator("#cg-node-details").is_visible()
    assert page.locator(f'.cg-node[data-id="{first}"]').get_attribute("aria-pressed") == "true"
    stored = httpx.get(f"{server}/api/graphs/{slug}/views/{view_id}").json()
    assert stored["pinned"] == [first, second] and stored["node_threshold"] == 0.6
    assert stored["supernodes"] == [{"name": name, "nodes": [first, second]}]
    assert stored["selected"] == first
    assert_local(page, server)


def test_export_downloads_circuit_tracer_json(
    page: Any, server: str, slug: str, tmp_path: Path
) -> None:
    from tzoo.circuits.graph_json import read_graph_json

    open_graph(page, server, slug)
    set_slider(page, "#cg-edge-slider", 0.5)
    with page.expect_download() as download:
        page.click("#cg-export")
    path = tmp_path / "graph.json"
    download.value.save_as(path)
    assert download.value.suggested_filename == f"tzoo-graph-{slug}.json"
    graph = read_graph_json(path)
    assert graph.metadata.slug == slug and graph.metadata.prompt == PROMPT
    assert len(graph.links) == page.locator(".cg-link").count()  # at the page's thresholds
    assert set(json.loads(path.read_text())) == {"metadata", "qParams", "nodes", "links"}
    assert_local(page, server)


def test_intervention_panel_shows_logits_before_and_after(
    page: Any, server: str, slug: str
) -> None:
    open_graph(page, server, slug)
    assert page.locator("#cg-intervene").is_hidden()
    page.locator(".cg-node.kind-token").first.click()
    assert page.locator("#cg-intervene").is_hidden()  # only features
    node = page.locator(".cg-node.kind-feature").first
    node.click()
    page.fill("#cg-intervene-amount", "0")
    page.click("#cg-intervene-run")
    page.wait_for_selector("#cg-intervene-table")
    assert page.locator("#cg-intervene-table tbody tr").count() == 10
    assert page.locator(".cg-tracked li").count() >= 1
    assert "(frozen mode)" in page.locator("#cg-intervene-table caption").text_content()


def test_form_computes_a_graph_and_opens_it(page: Any, server: str) -> None:
    page.goto(f"{server}/graph")
    assert page.locator("#cg-transcoders option").all_text_contents() == [SET_ID]
    page.fill("#cg-prompt", "Dogs ran.")
    page.fill("#cg-max-nodes", "20")
    page.click("#cg-submit")
    page.wait_for_url(f"{server}/graph/*")
    page.wait_for_selector("#tzoo-graph[data-ready=true]")
    assert page.locator("#cg-prompt-text").text_content() == "Dogs ran."
    # Errors come back as a sentence in the form.
    page.goto(f"{server}/graph")
    page.fill("#cg-target", "99")
    page.click("#cg-submit")
    page.wait_for_selector("#cg-error:not([hidden])")
    assert "outside the prompt" in page.locator("#cg-error").text_content()
    assert_local(page, server)


def test_user_text_stays_inert_in_both_themes(page: Any, server: str) -> None:
    evil = create_graph(server, f"Hi {XSS}")
    open_graph(page, server, evil)
    assert page.locator("#cg-prompt-text").text_content() == f"Hi {XSS}"
    assert page.locator(".cg-token-label").all_text_contents()[4] == "<"
    page.locator(".cg-node.kind-token").nth(4).click()
    assert "“<”" in page.locator("#cg-node-title").text_content()
    assert page.locator("#cg-node-panel img").count() == 0
    theme = page.evaluate("document.documentElement.dataset.theme")
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") != theme
    assert page.locator(".cg-node").count() > 0
    assert page.evaluate("window.__pwned") is None
    assert_local(page, server)


def test_comments_anchor_to_the_selected_node(page: Any, server: str, slug: str) -> None:
    open_graph(page, server, slug)
    assert page.locator("#cg-comment-form").is_hidden()  # anonymous: a link to log in
    page.goto(f"{server}/signup")
    page.fill("#username", "grace")
    page.fill("#password", "correct horse battery")
    page.fill("#password_confirm", "correct horse battery")
    page.locator("form[action='/signup'] button[type=submit]").click()
    page.wait_for_url(lambda url: "/signup" not in url)
    open_graph(page, server, slug)
    node = page.locator(".cg-node.kind-feature").first
    node.click()
    layer = page.locator("#cg-node-title").text_content().split("layer ")[1].split(" ")[0]
    assert f"layer {layer}" in page.locator("#cg-comment-anchor").text_content()
    page.fill("#cg-comment-body", f"Fires on {XSS}")
    page.click("#cg-comment-post")
    page.wait_for_selector(".cg-comment")
    assert page.locator(".cg-comment-body").text_content() == f"Fires on {XSS}"
    assert f"layer {layer}" in page.locator(".cg-comment-meta").text_content()
    assert page.locator(".cg-comment img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert_local(page, server)


# -- explanations (the circuit agent) ---------------------------------------------------------


def open_explain_panel(page: Any) -> None:
    assert page.locator("#cg-explain").is_hidden()
    page.click("#cg-explain-open")
    assert page.locator("#cg-explain").is_visible()
    assert page.locator("#cg-explain-open").get_attribute("aria-expanded") == "true"


def test_an_explanation_shows_its_progress_then_its_paths_and_stays(
    page: Any, server: str, slug: str, document: dict[str, Any]
) -> None:
    open_graph(page, server, slug)
    open_explain_panel(page)
    info = document["tzoo"]
    # The graph's logit tokens to choose from, then "another token".
    options = page.locator("#cg-explain-target option")
    assert options.count() == len(info["logit_tokens"]) + 1
    assert options.first.get_attribute("value") == str(info["logit_tokens"][0])
    page.fill("#cg-explain-paths", "10")
    page.uncheck("#cg-explain-label")
    page.click("#cg-explain-run")
    # The job's progress shows (the page polls after a pause), then the answer.
    page.wait_for_selector("#cg-explain-progress-box:not([hidden])")
    assert page.locator("#cg-explain").get_attribute("data-state") in ("queued", "running")
    assert page.locator("#cg-explain-stage").text_content().strip()
    page.wait_for_selector("#cg-explain[data-state=done]", timeout=60_000)
    assert page.locator("#cg-explain-progress-box").is_hidden()
    explanation = page.evaluate("new URLSearchParams(location.search).get('explanation')")
    stored = httpx.get(f"{server}/api/graphs/{slug}/explanations/{explanation}").json()
    answer = stored["answer"]
    assert stored["request"] == {
        "target": info["logit_tokens"][0],
        "target_token": info["logit_tokens"][0],
        "n_paths": 10,
        "label": False,
    }
    rows = page.locator("#cg-explain-paths-list > li")
    assert rows.count() == len(answer["paths"]) == 10
    for i in (0, 9):
        path = answer["paths"][i]
        row = rows.nth(i)
        assert row.locator(".cg-step").count() == len(path["steps"])
        assert row.locator(".cg-arrow").count() == len(path["steps"]) - 1
        sign = "positive" if path["sign"] > 0 else "negative"
        assert sign in row.get_attribute("class").split()
    assert page.locator("#cg-explain-summary .cg-token").text_content() == answer["target_text"]
    assert "not labelled" in page.locator("#cg-explain-summary").text_content()
    # A feature step that the graph kept selects its node.
    step = page.locator(".cg-step.kind-feature[data-node-id]").first
    node_id = step.get_attribute("data-node-id")
    step.click()
    assert page.locator(f'.cg-node[data-id="{node_id}"]').get_attribute("aria-pressed") == "true"
    node = next(n["tzoo"] for n in document["nodes"] if n["node_id"] == node_id)
    assert (
        page.locator("#cg-node-title")
        .text_content()
        .startswith(f"Feature {node['feature']} · layer {node['layer']}")
    )
    # Stored: the permalink reopens the panel on it, and the list of saved ones has it.
    assert (
        page.locator("#cg-explain-permalink")
        .get_attribute("href")
        .endswith(f"/graph/{slug}?explanation={explanation}")
    )
    page.reload()
    page.wait_for_selector("#tzoo-graph[data-ready=true]")
    page.wait_for_selector("#cg-explain[data-state=done]")
    assert page.locator("#cg-explain").is_visible()
    assert page.locator("#cg-explain-paths-list > li").count() == 10
    page.wait_for_selector(f'#cg-explain-saved a[data-id="{explanation}"]')
    assert_local(page, server)


def test_another_token_and_a_bad_target_in_the_explain_panel(
    page: Any, server: str, slug: str
) -> None:
    open_graph(page, server, slug)
    open_explain_panel(page)
    assert page.locator("#cg-explain-token").is_hidden()
    page.select_option("#cg-explain-target", "other")
    assert page.locator("#cg-explain-token").is_visible()
    page.uncheck("#cg-explain-label")
    # Several tokens: the server's sentence, as text (the target is user text).
    page.fill("#cg-explain-token", XSS)
    page.click("#cg-explain-run")
    page.wait_for_selector("#cg-explain-error:not([hidden])")
    error = page.locator("#cg-explain-error").text_content()
    assert f"is {len(XSS)} tokens" in error and XSS in error
    assert page.locator("#cg-explain img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#cg-explain").get_attribute("data-state") == "failed"
    # Too many paths: refused before asking.
    page.fill("#cg-explain-token", "t")
    page.fill("#cg-explain-paths", "25")
    page.click("#cg-explain-run")
    assert "from 1 to 20" in page.locator("#cg-explain-error").text_content()
    # One token typed in: explained.
    page.fill("#cg-explain-paths", "2")
    page.click("#cg-explain-run")
    page.wait_for_selector("#cg-explain[data-state=done]", timeout=60_000)
    assert page.locator("#cg-explain-error").is_hidden()
    assert page.locator("#cg-explain-summary .cg-token").text_content() == "t"
    assert page.locator("#cg-explain-paths-list > li").count() == 2
    assert_local(page, server)
