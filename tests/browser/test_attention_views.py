"""The attention explorer's views in a real browser, from standalone export files opened
with file:// (no server): every view draws, the numbers agree with the model, the state
lives in the URL, themes switch, user text stays inert, exports download, and nothing is
requested from anywhere."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tzoo.web.standalone import render_result_html, render_standalone_html, split_parts

pytestmark = pytest.mark.browser

XSS = "<img src=x onerror=window.__pwned=1>"
TEXT = "The cat sat on the mat. The cat sat"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Real results of the tiny random-weight models (GPT-2, BERT pair, T5)."""
    from tzoo_testing import make_settings

    from tzoo.analyses.attention import attention
    from tzoo.runtime.manager import ModelManager

    manager = ModelManager(make_settings(tmp_path_factory.mktemp("models")))
    yield {
        "gpt2": attention(manager.get("tiny-gpt2"), TEXT),
        "bert": attention(manager.get("tiny-bert"), "A cat.", "It sat."),
        "t5": attention(manager.get("tiny-t5"), "Hello there.", "Hallo."),
    }
    manager.unload_all()


def write_export(result: Any, path: Path, *, evil_token: int | None = None) -> Path:
    from tzoo.analyses.attention_record import attention_meta, attention_parts

    meta = attention_meta(result)
    if evil_token is not None:  # a token text that would run script if used as markup
        for info in meta["stacks"].values():
            info["query_tokens"][evil_token] = XSS
            info["key_tokens"][evil_token] = XSS
        meta["tokens"][evil_token] = XSS
        meta["model_name"] = f"tiny {XSS}"
    attention, neurons, position_bias = split_parts(attention_parts(result))
    page = render_standalone_html(meta, attention, neurons, position_bias=position_bias)
    path.write_text(page, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_file(results: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(
        results["gpt2"], tmp_path_factory.mktemp("export") / "gpt2.html", evil_token=3
    )


def open_view(page: Any, file: Path, hash_: str = "") -> None:
    page.goto(file.as_uri() + hash_)
    page.wait_for_selector("#tzoo-attention[data-ready=true]")


def current_hash(page: Any) -> dict[str, str]:
    raw = page.evaluate("location.hash").lstrip("#")
    return dict(part.split("=", 1) for part in raw.split("&") if part)


def assert_offline(page: Any) -> None:
    assert page.requests, "the page made no request at all?"
    for url in page.requests:
        assert url.split(":", 1)[0] in {"file", "data", "blob"}, url


def test_float16_decoder_matches_numpy_for_every_bit_pattern(page, gpt2_file: Path) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file)
    values = page.evaluate(
        """async () => {
            const { decodeFloat16 } = await import("tzoo/attention/float16.js");
            const bytes = new Uint8Array(65536 * 2);
            for (let h = 0; h < 65536; h++) { bytes[2 * h] = h & 255; bytes[2 * h + 1] = h >> 8; }
            return Array.from(decodeFloat16(bytes), (v) => Number.isNaN(v) ? "nan" : v === Infinity ? "inf" : v === -Infinity ? "-inf" : v);
        }"""
    )
    expected = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
    got = np.array([float(v) for v in values])
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.array_equal(got[finite], expected[finite])


def test_head_view_draws_lines_hover_and_head_toggles(page, gpt2_file: Path, results) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=head&layer=1")
    svg = page.locator("svg.tzv-headsvg")
    tokens = len(results["gpt2"].tokens)
    assert int(svg.get_attribute("data-lines")) > 0
    assert svg.locator("g.tok.q").count() == tokens and svg.locator("g.tok.k").count() == tokens
    all_lines = int(svg.get_attribute("data-lines"))

    # Hovering a query shows only its lines: at most heads x (its position + 1) (causal).
    svg.locator('g.tok.q[data-i="5"]').hover()
    hovered = int(svg.get_attribute("data-lines"))
    assert 0 < hovered <= 4 * 6 < all_lines
    assert "attends most to" in page.locator("#tzv-panel-head .tzv-readout").inner_text()
    page.mouse.move(5, 5)

    # Click toggles a head; double-click isolates one; both land in the URL.
    chips = page.locator(".tzv-chip")
    assert chips.count() == 4
    chips.nth(1).click()
    assert current_hash(page)["heads"] == "0,2,3"
    assert chips.nth(1).get_attribute("aria-pressed") == "false"
    chips.nth(2).dblclick()
    assert current_hash(page)["heads"] == "2"
    assert {
        int(h)
        for h in svg.locator("g.hv-lines path").evaluate_all("ps => ps.map(p => p.dataset.head)")
    } == {2}

    # Clicking a token pins it (in the URL); the layer arrows move the layer.
    svg.locator('g.tok.q[data-i="7"]').click()
    assert current_hash(page)["token"] == "7"
    page.locator("#tzv-layer-prev").click()
    assert current_hash(page)["layer"] == "0"
    assert_offline(page)


def test_head_view_heat_map_display(page, gpt2_file: Path, results) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=head&layer=1&heads=0,2")
    page.locator("#tzv-display").select_option("matrix")
    assert current_hash(page)["display"] == "matrix"
    blocks = page.locator("svg.tzv-matrixsvg g.hm-block")
    assert blocks.evaluate_all("bs => bs.map(b => b.dataset.head)") == ["0", "2"]
    assert page.locator("svg.tzv-headsvg").is_hidden()
    hit = blocks.nth(1).locator("rect.hm-hit")
    box = hit.bounding_box()
    hit.hover(position={"x": box["width"] - 2, "y": box["height"] - 2})  # last query, last key
    tokens = len(results["gpt2"].tokens)
    expected = results["gpt2"].attentions[1, 2, tokens - 1, tokens - 1]
    readout = page.locator("#tzv-panel-head .tzv-readout").inner_text()
    assert f"query {tokens - 1}" in readout and f"{expected:.4f}"[:5] in readout
    page.reload()
    page.wait_for_selector("#tzoo-attention[data-ready=true]")
    assert page.locator("#tzv-display").input_value() == "matrix"
    page.locator("#tzv-display").select_option("lines")
    assert "display" not in current_hash(page)
    assert int(page.locator("svg.tzv-headsvg").get_attribute("data-lines")) > 0


def test_model_view_has_every_cell_and_opens_the_head_view(page, gpt2_file: Path, results) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file)
    page.get_by_role("tab", name="Model").click()
    assert current_hash(page)["view"] == "model"
    result = results["gpt2"]
    cells = page.locator(".tzv-cellwrap")
    assert cells.count() == result.n_layers * result.n_heads
    page.wait_for_function("document.querySelectorAll('.tzv-cellwrap.is-loading').length === 0")
    page.locator('.tzv-cellwrap[data-layer="1"][data-head="3"] button.tzv-cell').click()
    state = current_hash(page)
    assert (state["view"], state["layer"], state["heads"]) == ("head", "1", "3")
    assert page.locator("#tzv-panel-head").is_visible()
    assert page.locator(".tzv-chip[aria-pressed=true]").all_inner_texts() == ["3"]
    assert_offline(page)


def test_neuron_view_score_softmax_equals_the_stored_attention(
    page, gpt2_file: Path, results
) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=neuron&layer=1&head=2&token=9")
    summary = page.locator(".tzv-verify")
    assert summary.get_attribute("data-matches") == "true"
    assert float(summary.get_attribute("data-max-diff")) < 1e-3
    rows = page.locator("g.nv-row").evaluate_all(
        """rs => rs.map(r => ({ j: +r.dataset.j, score: r.dataset.score, softmax: +r.dataset.softmax,
            attention: +r.dataset.attention,
            shownSoftmax: +r.querySelector('.nv-softmax').textContent,
            shownAttention: +r.querySelector('.nv-attention').textContent }))"""
    )
    stored = results["gpt2"].attentions[1, 2, 9]  # (layers, heads, T, T) -> the row of query 9
    assert len(rows) == len(stored)
    for row in rows:
        assert abs(row["softmax"] - row["attention"]) < 1e-3
        assert abs(row["shownSoftmax"] - row["shownAttention"]) < 1e-3
        assert abs(row["attention"] - stored[row["j"]]) < 1e-3
        assert (row["score"] == "") == (row["j"] > 9)  # keys after the query are masked
    assert math.isclose(sum(r["softmax"] for r in rows), 1.0, abs_tol=1e-6)
    # Clicking a key token makes it the query.
    page.locator('g.nv-row[data-j="4"] .nv-token').click()
    assert current_hash(page)["token"] == "4"
    assert page.locator("g.nv-row.is-query").get_attribute("data-j") == "4"
    assert_offline(page)


def test_stats_cells_open_that_head(page, gpt2_file: Path) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=stats")
    cells = page.locator("a.sv-cell")
    assert cells.count() == 2 * 4
    page.locator("#tzv-stat").select_option("sink")
    assert current_hash(page)["stat"] == "sink"
    page.locator('a.sv-cell[data-layer="1"][data-head="2"]').click()
    state = current_hash(page)
    assert (state["view"], state["layer"], state["heads"]) == ("head", "1", "2")
    assert page.locator(".tzv-chip[aria-pressed=true]").all_inner_texts() == ["2"]
    page.go_back()  # a navigation, so Back returns to the statistics
    page.wait_for_function("location.hash.includes('view=stats')")
    assert page.locator("#tzv-panel-stats").is_visible()


def test_the_url_hash_restores_the_view_and_keyboard_switches_tabs(page, gpt2_file: Path) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=neuron&stack=decoder&layer=1&head=3&token=6")
    for _ in range(2):
        assert page.locator("#tzv-tab-neuron").get_attribute("aria-selected") == "true"
        assert page.locator("#tzv-layer").input_value() == "1"
        assert page.locator("#tzv-head").input_value() == "3"
        assert page.locator("#tzv-token").input_value() == "6"
        page.reload()
        page.wait_for_selector("#tzoo-attention[data-ready=true]")
    page.locator("#tzv-tab-neuron").focus()
    page.keyboard.press("ArrowRight")
    assert current_hash(page)["view"] == "stats"
    assert page.evaluate("document.activeElement.id") == "tzv-tab-stats"
    page.keyboard.press("Home")
    assert current_hash(page)["view"] == "head"
    page.locator("#tzv-layer").select_option("0")
    page.reload()
    page.wait_for_selector("#tzoo-attention[data-ready=true]")
    assert current_hash(page)["layer"] == "0"
    assert page.locator("#tzv-tab-head").get_attribute("aria-selected") == "true"


def test_theme_toggle_switches_and_redraws(page, gpt2_file: Path) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=head")
    before = page.evaluate("document.documentElement.dataset.theme")
    colour = page.locator("g.hv-lines path").first.get_attribute("stroke")
    page.get_by_role("button", name="Switch light or dark theme").click()
    after = page.evaluate("document.documentElement.dataset.theme")
    assert {before, after} == {"light", "dark"}
    assert page.locator("g.hv-lines path").first.get_attribute("stroke") != colour
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.reload()
    page.wait_for_selector("#tzoo-attention[data-ready=true]")
    assert page.evaluate("document.documentElement.dataset.theme") == after
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == background


def test_user_text_stays_inert_text(page, gpt2_file: Path) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, "#view=head&token=3")
    page.locator('g.tok.q[data-i="3"]').hover()
    for view in ("Model", "Neuron", "Head statistics", "Head"):
        page.get_by_role("tab", name=view, exact=True).click()
    page.locator("#tzv-token").select_option("3")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    label = page.locator('g.tok.q[data-i="3"] text').text_content()
    assert label is not None and label.startswith("<img src=x")
    assert XSS in page.locator(".tzv-model").inner_text()
    assert XSS in page.locator("#tzv-panel-head .tzv-readout").inner_text()


@pytest.mark.parametrize("view", ["head", "model", "neuron", "stats"])
def test_png_and_svg_exports_download(page, gpt2_file: Path, view: str) -> None:  # type: ignore[no-untyped-def]
    open_view(page, gpt2_file, f"#view={view}")
    for fmt in ("svg", "png"):
        with page.expect_download() as info:
            page.locator(f"#tzv-export-{fmt}").click()
        download = info.value
        assert download.suggested_filename.endswith("." + fmt)
        assert view in download.suggested_filename
        data = Path(download.path()).read_bytes()
        if fmt == "png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
        else:
            text = data.decode("utf-8")
            assert text.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in text
            assert "<image" in text if view == "model" else "style=" in text
    assert "Saved" in page.locator("#tzv-status").inner_text()
    assert page.evaluate("window.__pwned") is None
    assert_offline(page)


def test_encoder_decoder_has_a_stack_selector(page, results, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    file = write_export(results["t5"], tmp_path / "t5.html")
    t5 = results["t5"]
    open_view(page, file)
    stack = page.locator("#tzv-stack")
    assert stack.is_visible()
    assert stack.locator("option").evaluate_all("os => os.map(o => o.value)") == [
        "encoder",
        "decoder",
        "cross",
    ]
    stack.select_option("cross")
    assert current_hash(page)["stack"] == "cross"
    headings = page.locator(".hv-heading").all_text_contents()
    assert headings == ["Decoder (queries)", "Encoder (keys)"]
    svg = page.locator("svg.tzv-headsvg")
    assert svg.locator("g.tok.q").count() == len(t5.cross.query_tokens)
    assert svg.locator("g.tok.k").count() == len(t5.cross.key_tokens)
    assert int(svg.get_attribute("data-lines")) > 0
    page.get_by_role("tab", name="Neuron").click()
    assert "Cross attention has no neuron view" in page.locator("#tzv-panel-neuron").inner_text()
    stack.select_option("encoder")
    summary = page.locator(".tzv-verify")
    assert summary.get_attribute("data-matches") in {"true", "false"}
    assert_offline(page)


def test_t5_neuron_view_adds_the_position_bias_and_matches(page, results, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t5 = results["t5"]
    encoder = t5.encoder
    file = write_export(t5, tmp_path / "t5.html")
    open_view(page, file, "#view=neuron&stack=encoder&layer=1&head=1&token=2")
    summary = page.locator(".tzv-verify")
    assert summary.get_attribute("data-matches") == "true", summary.inner_text()
    assert float(summary.get_attribute("data-max-diff")) < 1e-3
    assert "bias" in summary.inner_text() and "they match" in summary.inner_text()
    titles = page.locator("svg.tzv-neuronsvg .nv-titles text").all_text_contents()
    assert "+ bias" in titles and "= score" in titles
    rows = page.locator("g.nv-row").evaluate_all(
        """rs => rs.map(r => ({ j: +r.dataset.j, score: +r.dataset.score, bias: +r.dataset.bias,
            dot: +r.querySelector('.nv-dot').textContent,
            shownBias: +r.querySelector('.nv-bias').textContent,
            shownScore: +r.querySelector('.nv-score').textContent }))"""
    )
    bias = encoder.position_bias[1, 2]  # (heads, Tq, Tk) -> head 1, query 2
    assert len(rows) == len(encoder.key_tokens)
    for row in rows:
        assert abs(row["bias"] - bias[row["j"]]) < 2e-3  # float16 in the file
        # What the reader sees adds up: q·k + bias = score (to the shown decimals).
        assert abs(row["dot"] + row["shownBias"] - row["shownScore"]) < 2.5e-3
    # Every layer of the stack reuses the one bias; the decoder's has its causal mask too.
    for hash_ in (
        "#view=neuron&stack=encoder&layer=0&head=3&token=0",
        "#view=neuron&stack=decoder&layer=1&head=0",
    ):
        open_view(page, file, hash_)
        assert page.locator(".tzv-verify").get_attribute("data-matches") == "true"
    assert_offline(page)


def test_sentence_pair_filter(page, results, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bert = results["bert"]
    b = bert.sentence_b_start
    file = write_export(bert, tmp_path / "bert.html")
    open_view(page, file, "#view=head&filter=ab")
    svg = page.locator("svg.tzv-headsvg")
    assert page.locator("#tzv-filter").input_value() == "ab"
    assert svg.locator("g.tok.q").count() == b
    assert svg.locator("g.tok.k").count() == len(bert.tokens) - b
    page.locator("#tzv-filter").select_option("bb")
    assert svg.locator("g.tok.q").count() == len(bert.tokens) - b
    page.locator("#tzv-filter").select_option("all")
    assert "filter" not in current_hash(page)


def test_the_jupyter_frame_runs_sandboxed(page, results, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    file = tmp_path / "notebook.html"
    file.write_text("<!doctype html><title>nb</title>" + render_result_html(results["gpt2"]))
    page.goto(file.as_uri())
    frame = page.frame_locator("iframe.tzoo-attention")
    frame.locator("#tzoo-attention[data-ready=true]").wait_for()
    frame.get_by_role("tab", name="Model").click()
    assert frame.locator(".tzv-cellwrap").count() == 8
    assert_offline(page)
