"""One self-contained HTML file of an attention visualization, for download and Jupyter.

The file holds everything the views need and loads nothing: the stylesheets inline, d3 as
a classic ``data:`` script, our ES modules through an import map of ``data:`` URLs (the
same bare specifiers the site maps to ``/static/js/attention/``), and the data as JSON with
one base64 float16 block per layer (and one per stack for T5's position bias). A
Content-Security-Policy forbids any connection, so a file opened from disk or inside a
notebook cannot reach the network even by mistake.

Pure Python: no database, no app, no model. ``render_result_html`` wraps the page in an
``<iframe srcdoc>`` for ``_repr_html_`` in Jupyter.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
from collections.abc import Mapping
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

WEB_DIR = Path(str(files("tzoo.web")))
MODULE_DIR = WEB_DIR / "static" / "js" / "attention"
SPECIFIER_PREFIX = "tzoo/attention/"
FORMAT_VERSION = 1

# No request of any kind: scripts and images only from inline text and data:/blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline' data:; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'none'; font-src 'none'; form-action 'none'; "
    "base-uri 'none'"
)

# Set the theme before the first paint (the modules load a moment later).
_THEME_SCRIPT = (
    "try{var t=localStorage.getItem('tzoo-theme')}catch(e){}"
    "document.documentElement.dataset.theme=t||(window.matchMedia&&"
    "matchMedia('(prefers-color-scheme: dark)').matches?'dark':'light');"
)


def render_standalone_html(
    meta: dict[str, Any],
    attention: Mapping[str, np.ndarray],
    neurons: Mapping[str, np.ndarray] | None = None,
    *,
    position_bias: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
) -> str:
    """The whole explorer as one HTML document that works offline.

    ``meta`` follows the ``GET /api/visualizations/{slug}`` contract; ``attention`` maps
    ``"{stack}.{layer}"`` to float arrays ``(heads, Tq, Tk)``; ``neurons`` maps the same
    names to ``(2, heads, T, d_head)`` (queries, then keys); ``position_bias`` maps a stack
    name to the ``(heads, Tq, Tk)`` bias T5 adds to every layer's scores. Layers missing
    from the mappings show a message in the views instead of a picture.
    """
    neurons = neurons or {}
    position_bias = position_bias or {}
    payload = {
        "format_version": FORMAT_VERSION,
        "meta": _export_meta(meta, neurons, position_bias),
        "attention": {name: _layer_block(name, a, ndim=3) for name, a in attention.items()},
        "neurons": {name: _layer_block(name, n, ndim=4) for name, n in neurons.items()},
        "position_bias": {stack: _bias_block(stack, b, meta) for stack, b in position_bias.items()},
    }
    title = title or f"Attention — {meta.get('model_name', 'Transformer Zoo')}"
    view = _view_template().render(
        viz=payload["meta"], readonly=True, standalone=True, export_url=None
    )
    importmap = {"imports": _module_urls()}
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en" data-theme="light">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="Transformer Zoo">',
            f"<title>{html.escape(title)}</title>",
            f"<script>{_THEME_SCRIPT}</script>",
            f"<style>{_stylesheets()}</style>",
            f'<script src="data:text/javascript;base64,{_d3_base64()}"></script>',
            f'<script type="importmap">{script_json(importmap)}</script>',
            "</head>",
            "<body>",
            '<main class="tzv-page">',
            view,
            '<p class="tzv-page-foot">Exported from Transformer Zoo. This file holds its '
            "data and works offline.</p>",
            "</main>",
            f'<script type="application/json" id="tzoo-embedded">{script_json(payload)}</script>',
            '<script type="module">import { start } from "tzoo/attention/main.js"; start();</script>',
            "</body>",
            "</html>",
        ]
    )


def render_result_html(result: Any, *, height: int | None = None) -> str:
    """An ``AttentionResult`` as an ``<iframe srcdoc>`` holding the standalone page, for
    Jupyter's ``_repr_html_``: the page's scripts and styles stay inside the frame."""
    from tzoo.analyses.attention_record import attention_meta, attention_parts

    meta = attention_meta(result)
    attention, neurons, position_bias = split_parts(attention_parts(result))
    page = render_standalone_html(meta, attention, neurons, position_bias=position_bias)
    tokens = max(
        (len(s.get("query_tokens", [])) for s in meta.get("stacks", {}).values()), default=0
    )
    height = height or max(620, min(920, 380 + 22 * tokens))
    label = html.escape(f"Attention of {meta.get('model_name', 'a model')}", quote=True)
    return (
        f'<iframe class="tzoo-attention" title="{label}" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width:100%;height:{int(height)}px;border:1px solid #dcdfe6;border-radius:8px" '
        'sandbox="allow-scripts allow-downloads"></iframe>'
    )


def split_parts(
    parts: Mapping[str, Mapping[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Stored parts (``tzoo.analyses.attention_record``) to the arrays the views read:
    attention by ``"{stack}.{layer}"`` ``(H, Tq, Tk)``; where queries and keys have the same
    length (self-attention), queries and keys stacked ``(2, H, T, D)`` by the same name;
    and the position bias by stack name ``(H, Tq, Tk)`` (T5)."""
    attention = {
        name: arrays["attention"] for name, arrays in parts.items() if "attention" in arrays
    }
    neurons: dict[str, np.ndarray] = {}
    position_bias: dict[str, np.ndarray] = {}
    for name, arrays in parts.items():
        if name.endswith(".neurons"):
            queries, keys = np.asarray(arrays["queries"]), np.asarray(arrays["keys"])
            if queries.shape == keys.shape:
                neurons[name.removesuffix(".neurons")] = np.stack([queries, keys])
        elif name.endswith(".position_bias"):
            position_bias[name.removesuffix(".position_bias")] = arrays["position_bias"]
    return attention, neurons, position_bias


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` are written
    as ``\\u`` escapes, so no text (``</script>``, ``<!--``) can end or change the element.
    Non-finite floats become null (JSON has no NaN)."""
    text = json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# -- helpers ------------------------------------------------------------------------------


def _export_meta(
    meta: Mapping[str, Any],
    neurons: Mapping[str, np.ndarray],
    position_bias: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """The metadata as the export shows it: a stack offers the neuron view only when its
    query/key vectors are in the file, and claims a position bias only when that is too."""
    exported = copy.deepcopy(dict(meta))
    stacks = exported.get("stacks") or {}
    for stack, info in stacks.items():
        info["has_neurons"] = bool(info.get("has_neurons", True)) and any(
            name.rsplit(".", 1)[0] == stack for name in neurons
        )
        info["has_position_bias"] = bool(info.get("has_position_bias")) and (stack in position_bias)
    return exported


def _layer_block(name: str, array: np.ndarray, *, ndim: int) -> dict[str, Any]:
    values = np.asarray(array)
    if values.ndim != ndim or (ndim == 4 and values.shape[0] != 2):
        expected = "(heads, Tq, Tk)" if ndim == 3 else "(2, heads, T, d_head)"
        raise ValueError(f"{name!r} has shape {values.shape}; expected {expected}.")
    if "." not in name:
        raise ValueError(f"Array names are '{{stack}}.{{layer}}', got {name!r}.")
    return _float16_block(values)


def _bias_block(stack: str, array: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    values = np.asarray(array)
    stacks = meta.get("stacks") or {}
    if stack not in stacks:
        raise ValueError(f"Position bias for stack {stack!r}; the stacks are {', '.join(stacks)}.")
    if values.ndim != 3:
        raise ValueError(
            f"The {stack} position bias has shape {values.shape}; expected (heads, Tq, Tk)."
        )
    return _float16_block(values)


def _float16_block(values: np.ndarray) -> dict[str, Any]:
    with np.errstate(over="ignore"):
        data = np.ascontiguousarray(values, dtype="<f2")
    return {
        "shape": list(data.shape),
        "dtype": "float16",
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@lru_cache(maxsize=1)
def _view_template() -> Any:
    environment = Environment(
        loader=FileSystemLoader(WEB_DIR / "templates"), autoescape=select_autoescape()
    )
    return environment.get_template("attention/_view.html")


@lru_cache(maxsize=1)
def _module_urls() -> dict[str, str]:
    """Every view module as a ``data:`` URL under its bare specifier."""
    urls = {}
    for path in sorted(MODULE_DIR.glob("*.js")):
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        urls[SPECIFIER_PREFIX + path.name] = f"data:text/javascript;base64,{encoded}"
    return urls


@lru_cache(maxsize=1)
def _d3_base64() -> str:
    return base64.b64encode((WEB_DIR / "static/vendor/d3/d3.min.js").read_bytes()).decode("ascii")


@lru_cache(maxsize=1)
def _stylesheets() -> str:
    css = "\n".join(
        (WEB_DIR / "static/css" / name).read_text(encoding="utf-8")
        for name in ("tzoo.css", "attention.css")
    )
    return css.replace("</", "<\\/")  # cannot end the <style> element
