"""Feature dashboards as artefacts: stored once per (feature, transcoder set, corpus,
options) under a content key, found again by that key, and shown at a permalink.

A dashboard is mostly numbers about short token windows, so it is stored as arrays, not as
JSON: every context's token ids and activations end to end (int32, float32) with a table
of where each begins and to which part of the dashboard it belongs; the logits and the
histogram as arrays; each distinct token's text once, in the params. ``decode_dashboard``
gives back exactly ``FeatureDashboard.to_dict()``: its numbers have a few significant digits
(``round_significant``), which float32 holds and the decoder rounds back to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from tzoo.circuits.features import round_significant
from tzoo.store.artefacts import create_artefact, find_artefact, load_arrays
from tzoo.store.models import Artefact

DASHBOARD_KIND = "feature_dashboard"
_FORMAT = 1
# Context groups in the ``group`` column: the top contexts, the inactive ones, and
# quantile bins 0, 1, ... by their index.
_TOP, _INACTIVE = -1, -2
_SCALARS = (
    "version",
    "model_name",
    "layer",
    "feature",
    "n_tokens",
    "n_active",
    "frequency",
    "max_activation",
    "mean_activation",
    "logits_layer",
)


class NoSuchDashboardError(LookupError):
    """No stored dashboard has this slug."""


def dashboard_key(**what: Any) -> str:
    """The content key of a dashboard built from ``what`` (JSON-able values)."""
    text = json.dumps(what, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def encode_dashboard(dashboard: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(params, arrays) holding ``dashboard`` (a ``FeatureDashboard.to_dict()``)."""
    groups: list[tuple[int, Mapping[str, Any]]] = [(_TOP, c) for c in dashboard["top_contexts"]]
    for index, bin_ in enumerate(dashboard["quantiles"]):
        groups += [(index, c) for c in bin_["contexts"]]
    groups += [(_INACTIVE, c) for c in dashboard.get("inactive_contexts", [])]
    strings: dict[int, str] = {}
    for _, context in groups:
        strings.update(zip(context["token_ids"], context["tokens"], strict=True))
    for entry in [*dashboard["top_logits"], *dashboard["bottom_logits"]]:
        strings[int(entry["token_id"])] = entry["token"]
    contexts = np.array(
        [(g, c["document"], c["position"], c["index"], len(c["token_ids"])) for g, c in groups],
        dtype=np.int32,
    ).reshape(-1, 5)
    arrays = {
        "contexts": contexts,  # group, document, position, index, length
        "token_ids": _concat([c["token_ids"] for _, c in groups], np.int32),
        "activations": _concat([c["activations"] for _, c in groups], np.float32),
        "top_logit_ids": np.array([t["token_id"] for t in dashboard["top_logits"]], np.int32),
        "top_logits": np.array([t["logit"] for t in dashboard["top_logits"]], np.float32),
        "bottom_logit_ids": np.array([t["token_id"] for t in dashboard["bottom_logits"]], np.int32),
        "bottom_logits": np.array([t["logit"] for t in dashboard["bottom_logits"]], np.float32),
        "histogram_edges": np.array(dashboard["histogram"]["edges"], np.float32),
        "histogram_counts": np.array(dashboard["histogram"]["counts"], np.int64),
    }
    params = {name: dashboard[name] for name in _SCALARS}
    params["format"] = _FORMAT
    params["quantiles"] = [
        {"low": q["low"], "high": q["high"], "n_active": q["n_active"]}
        for q in dashboard["quantiles"]
    ]
    params["strings"] = {str(token): text for token, text in sorted(strings.items())}
    return params, arrays


def decode_dashboard(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ``FeatureDashboard.to_dict()`` that ``encode_dashboard`` stored."""
    strings = {int(k): v for k, v in params["strings"].items()}
    ids, acts = arrays["token_ids"].tolist(), round_significant(arrays["activations"].tolist())
    top: list[dict[str, Any]] = []
    inactive: list[dict[str, Any]] = []
    bins: list[dict[str, Any]] = [{**q, "contexts": []} for q in params["quantiles"]]
    start = 0
    for group, document, position, index, length in arrays["contexts"].tolist():
        window = ids[start : start + length]
        context = {
            "document": document,
            "position": position,
            "index": index,
            "tokens": [strings[i] for i in window],
            "token_ids": window,
            "activations": acts[start : start + length],
        }
        start += length
        target = top if group == _TOP else inactive if group == _INACTIVE else None
        (bins[group]["contexts"] if target is None else target).append(context)

    def logits(which: str) -> list[dict[str, Any]]:
        ids = arrays[f"{which}_logit_ids"].tolist()
        values = round_significant(arrays[f"{which}_logits"].tolist())
        pairs = zip(ids, values, strict=True)
        return [{"token": strings[i], "token_id": i, "logit": v} for i, v in pairs]

    dashboard = {name: params[name] for name in _SCALARS}
    dashboard.update(
        top_contexts=top,
        quantiles=bins,
        top_logits=logits("top"),
        bottom_logits=logits("bottom"),
        histogram={
            "edges": round_significant(arrays["histogram_edges"].tolist()),
            "counts": arrays["histogram_counts"].tolist(),
        },
        inactive_contexts=inactive,
    )
    return dashboard


def stored_dashboard(session: Session, key: str) -> Artefact | None:
    return find_artefact(session, DASHBOARD_KIND, key)


def store_dashboard(
    session: Session, key: str, dashboard: Mapping[str, Any], source: Mapping[str, Any]
) -> Artefact:
    """Store ``dashboard`` under ``key`` (public: it holds only the shipped corpus and the
    transcoders' behaviour), with ``source`` (transcoder set, corpus) in its params; the
    artefact another writer stored first under the same key when there is one."""
    params, arrays = encode_dashboard(dashboard)
    params["source"] = dict(source)
    return create_artefact(
        session,
        kind=DASHBOARD_KIND,
        model_name=str(dashboard["model_name"]),
        input_text=f"layer {dashboard['layer']} feature {dashboard['feature']}",
        params=params,
        arrays=arrays,
        precision="float32",
        lookup_key=key,
    )


def dashboard_of(artefact: Artefact) -> dict[str, Any]:
    """The dashboard stored in ``artefact``, with its ``slug`` and ``source``."""
    if artefact.kind != DASHBOARD_KIND:
        raise NoSuchDashboardError(f"{artefact.slug!r} is not a feature dashboard.")
    params = artefact.params or {}
    dashboard = decode_dashboard(params, load_arrays(artefact))
    dashboard["slug"] = artefact.slug
    dashboard["source"] = params.get("source", {})
    return dashboard


def _concat(rows: Sequence[Sequence[float]], dtype: type) -> np.ndarray:
    if not rows:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(r, dtype=dtype) for r in rows])
