"""The standalone attention export: one HTML file that loads nothing, holds the data, and
keeps user text inert."""

from __future__ import annotations

import base64
import html
import json
import re
from typing import Any

import numpy as np
import pytest

from tzoo.web.standalone import (
    MODULE_DIR,
    SPECIFIER_PREFIX,
    render_result_html,
    render_standalone_html,
    script_json,
    split_parts,
)

EVIL = '</script><script>window.__pwned=1</script><!-- <img src=x onerror="window.__pwned=2">'


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hand_made(
    layers: int = 2, heads: int = 3, with_nan: bool = False
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A decoder visualization by hand: causal softmax of random q·k per layer."""
    rng = np.random.default_rng(0)
    tokens = ["<|endoftext|>", "The", " cat", EVIL, " sat", " down", "."]
    t, d = len(tokens), 8
    causal = np.triu(np.full((t, t), -np.inf), k=1)
    attention, neurons = {}, {}
    for layer in range(layers):
        q = rng.normal(size=(heads, t, d)).astype(np.float16).astype(np.float32)
        k = rng.normal(size=(heads, t, d)).astype(np.float16).astype(np.float32)
        attention[f"decoder.{layer}"] = softmax_rows(q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal)
        neurons[f"decoder.{layer}"] = np.stack([q, k])
    stats = rng.random((layers, heads)).tolist()
    if with_nan:
        stats[0][0] = float("nan")
    meta = {
        "slug": "abc123",
        "model_name": "hand <b>made</b>",
        "architecture": "decoder",
        "text": "The cat " + EVIL,
        "pair": None,
        "view_type": "head",
        "tokens": tokens,
        "token_ids": list(range(t)),
        "sentence_b_start": None,
        "n_layers": layers,
        "n_heads": heads,
        "stacks": {
            "decoder": {
                "query_tokens": tokens,
                "key_tokens": tokens,
                "n_layers": layers,
                "n_heads": heads,
                "has_neurons": True,
                "score_scale": 1 / np.sqrt(d),
            }
        },
        "head_stats": {
            "decoder": {
                "entropy": stats,
                "mean_distance": stats,
                "sink": stats,
                "previous_token": stats,
                "induction": None,
            }
        },
        "format_version": 1,
    }
    return meta, attention, neurons


def embedded_payload(page: str) -> dict[str, Any]:
    match = re.search(
        r'<script type="application/json" id="tzoo-embedded">(.*?)</script>', page, re.S
    )
    assert match, "no embedded data"
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def importmap(page: str) -> dict[str, str]:
    match = re.search(r'<script type="importmap">(.*?)</script>', page, re.S)
    assert match, "no import map"
    return json.loads(match.group(1))["imports"]  # type: ignore[no-any-return]


def decode_data_url(url: str) -> str:
    prefix = "data:text/javascript;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :]).decode("utf-8")


def float16_block(block: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(block["data"])
    return np.frombuffer(raw, dtype="<f2").reshape(block["shape"])


REMOTE = re.compile(
    r"""(?:\b(?:src|href|action|poster|data)\s*=\s*["']?\s*https?:"""
    r"""|url\(\s*["']?\s*https?:|@import|\bimport\s*\(?\s*["']https?:|from\s*["']https?:"""
    r"""|fetch\(\s*["']https?:|//\s*#\s*sourceMappingURL)""",
    re.I,
)


def test_the_page_loads_nothing_from_anywhere() -> None:
    meta, attention, neurons = hand_made()
    page = render_standalone_html(meta, attention, neurons)
    assert page.startswith("<!doctype html>")
    assert not REMOTE.search(page)
    assert not re.search(r"https?://", page), "no URL of any kind outside base64 blobs"
    # Every external script or stylesheet reference is a data: URL; no <link> at all.
    assert "<link" not in page
    for src in re.findall(r'<script[^>]*\bsrc="([^"]*)"', page):
        assert src.startswith("data:text/javascript;base64,")
    # The modules themselves: nothing remote, and only bare specifiers the map resolves
    # (a data: URL module cannot resolve a relative import).
    modules = importmap(page)
    for url in modules.values():
        source = decode_data_url(url)
        assert not REMOTE.search(source)
        for specifier in re.findall(r'^\s*import[^"\n]*"([^"]+)"', source, re.M):
            assert specifier in modules, specifier
    # And the policy forbids connections even if something tried.
    assert "connect-src 'none'" in page and "default-src 'none'" in page


def test_import_map_holds_every_view_module() -> None:
    meta, attention, neurons = hand_made()
    modules = importmap(render_standalone_html(meta, attention, neurons))
    expected = {SPECIFIER_PREFIX + p.name for p in MODULE_DIR.glob("*.js")}
    assert set(modules) == expected
    assert {"tzoo/attention/main.js", "tzoo/attention/data.js"} <= set(modules)
    for name, url in modules.items():
        assert (
            decode_data_url(url) == (MODULE_DIR / name.removeprefix(SPECIFIER_PREFIX)).read_text()
        )
    assert 'import { start } from "tzoo/attention/main.js"' in render_standalone_html(
        meta, attention
    )


def test_the_data_is_inside_as_float16() -> None:
    meta, attention, neurons = hand_made()
    payload = embedded_payload(render_standalone_html(meta, attention, neurons))
    assert payload["format_version"] == 1
    assert payload["meta"]["tokens"] == meta["tokens"]
    assert set(payload["attention"]) == set(attention)
    for name, array in attention.items():
        block = payload["attention"][name]
        assert block["dtype"] == "float16" and block["shape"] == list(array.shape)
        np.testing.assert_allclose(float16_block(block), array, atol=1e-3)
    for name, array in neurons.items():
        np.testing.assert_array_equal(float16_block(payload["neurons"][name]), array)


def test_user_text_cannot_close_the_script_or_the_markup() -> None:
    meta, attention, neurons = hand_made()
    page = render_standalone_html(meta, attention, neurons, title="<b>title</b>")
    # Only our own scripts open and close: the token text did not add a </script>.
    assert page.count("</script>") == len(re.findall(r"<script\b", page))
    assert "<script>window.__pwned" not in page
    assert "<!--" not in page
    assert '<img src=x onerror="' not in page
    # The visible header escapes; the title too.
    assert html.escape("hand <b>made</b>") in page
    assert "<title>&lt;b&gt;title&lt;/b&gt;</title>" in page
    # The data still holds the exact text.
    payload = embedded_payload(page)
    assert EVIL in payload["meta"]["tokens"]
    assert payload["meta"]["text"].endswith(EVIL)


def test_script_json_escapes_what_could_end_a_script() -> None:
    text = script_json({"a": "</script><!-- & \u2028", "n": float("nan"), "x": np.float32(0.5)})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><!-- & \u2028", "n": None, "x": 0.5}


def test_exports_are_read_only_and_neuron_view_follows_the_data() -> None:
    meta, attention, _ = hand_made(with_nan=True)
    page = render_standalone_html(meta, attention)
    assert 'data-readonly="true"' in page
    assert 'id="tzv-notes"' not in page and "Comment on this" not in page
    assert 'id="tzv-theme-toggle"' in page
    payload = embedded_payload(page)
    assert payload["meta"]["stacks"]["decoder"]["has_neurons"] is False
    assert payload["meta"]["head_stats"]["decoder"]["entropy"][0][0] is None


@pytest.mark.parametrize(
    ("name", "shape", "neurons"),
    [
        ("decoder.0", (2, 7), False),
        ("decoder", (2, 7, 7), False),
        ("decoder.0", (3, 2, 7, 8), True),
    ],
)
def test_bad_arrays_get_a_clear_error(name: str, shape: tuple[int, ...], neurons: bool) -> None:
    meta, attention, _ = hand_made()
    array = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"expected|stack"):
        if neurons:
            render_standalone_html(meta, attention, {name: array})
        else:
            render_standalone_html(meta, {name: array})


def test_split_parts_pairs_queries_and_keys_of_self_attention_only() -> None:
    q = np.ones((2, 3, 4), dtype=np.float32)
    parts = {
        "decoder.0": {"attention": np.ones((2, 3, 3))},
        "decoder.0.neurons": {"queries": q, "keys": q * 2},
        "cross.0": {"attention": np.ones((2, 3, 5))},
        "cross.0.neurons": {"queries": q, "keys": np.ones((2, 5, 4))},
        "decoder.position_bias": {"position_bias": np.zeros((2, 3, 3))},
    }
    attention, neurons, position_bias = split_parts(parts)
    assert set(attention) == {"decoder.0", "cross.0"}
    assert set(neurons) == {"decoder.0"} and neurons["decoder.0"].shape == (2, 2, 3, 4)
    assert set(position_bias) == {"decoder"} and position_bias["decoder"].shape == (2, 3, 3)


def test_the_position_bias_is_inside_per_stack_and_claimed_only_when_it_is() -> None:
    meta, attention, neurons = hand_made()
    meta["stacks"]["decoder"]["has_position_bias"] = True
    bias = np.random.default_rng(1).normal(size=(3, 7, 7)).astype(np.float32)
    payload = embedded_payload(
        render_standalone_html(meta, attention, neurons, position_bias={"decoder": bias})
    )
    assert payload["meta"]["stacks"]["decoder"]["has_position_bias"] is True
    np.testing.assert_allclose(float16_block(payload["position_bias"]["decoder"]), bias, atol=2e-3)
    # Without the array in the file the views must not look for it.
    payload = embedded_payload(render_standalone_html(meta, attention, neurons))
    assert payload["meta"]["stacks"]["decoder"]["has_position_bias"] is False
    assert payload["position_bias"] == {}


@pytest.mark.parametrize(
    ("stack", "shape", "phrase"),
    [("decoder", (3, 7), "expected"), ("encoder", (3, 7, 7), "stacks are decoder")],
)
def test_bad_position_bias_gets_a_clear_error(
    stack: str, shape: tuple[int, ...], phrase: str
) -> None:
    meta, attention, _ = hand_made()
    with pytest.raises(ValueError, match=phrase):
        render_standalone_html(meta, attention, position_bias={stack: np.zeros(shape)})


def test_a_real_result_renders_for_jupyter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tzoo_testing import make_settings

    from tzoo.analyses.attention import attention
    from tzoo.analyses.attention_record import attention_meta, attention_parts
    from tzoo.runtime.manager import ModelManager

    handle = ModelManager(make_settings(tmp_path)).get("tiny-gpt2")
    result = attention(handle, 'Say "</script>" & <b>')
    frame = render_result_html(result)
    assert frame.startswith('<iframe class="tzoo-attention"') and frame.endswith("</iframe>")
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame)
    assert srcdoc, "the page is one escaped attribute"
    page = html.unescape(srcdoc.group(1))
    attention_arrays, neurons, position_bias = split_parts(attention_parts(result))
    assert page == render_standalone_html(
        attention_meta(result), attention_arrays, neurons, position_bias=position_bias
    )
    assert 'sandbox="allow-scripts allow-downloads"' in frame
    assert "<script" not in frame.split("srcdoc=")[0]
    payload = embedded_payload(page)
    assert payload["meta"]["model_name"] == "tiny-gpt2"
    assert payload["meta"]["stacks"]["decoder"]["has_neurons"] is True
    np.testing.assert_allclose(
        float16_block(payload["attention"]["decoder.1"]), result.attentions[1], atol=1e-3
    )
    assert result._repr_html_() == frame
