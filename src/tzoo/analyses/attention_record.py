"""An AttentionResult as a record for the store and the views: JSON-safe metadata plus
named parts of float32 arrays, one part per layer so a view loads only what it shows.

Parts (``{stack}`` is ``encoder``, ``decoder`` or ``cross``):

- ``{stack}.{layer}``: ``{"attention": (heads, Tq, Tk)}``
- ``{stack}.{layer}.neurons``: ``{"queries": (heads, Tq, d_head), "keys": (heads, Tk,
  d_head)}`` when the stack has query/key vectors (``has_neurons``)
- ``{stack}.position_bias``: ``{"position_bias": (heads, Tq, Tk)}`` for T5's self-attention
  stacks (``has_position_bias``), shared by every layer of the stack
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from tzoo.analyses.attention import STAT_NAMES, AttentionResult, AttentionStack

FORMAT_VERSION = 1
Parts = dict[str, dict[str, np.ndarray]]


def attention_meta(result: AttentionResult) -> dict[str, Any]:
    """Everything but the big arrays, JSON-safe (NaN statistics become None)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_name": result.model_name,
        "architecture": result.architecture,
        "text": result.text,
        "pair": result.pair,
        "tokens": list(result.tokens),
        "token_ids": [int(i) for i in result.token_ids],
        "sentence_b_start": result.sentence_b_start,
        "n_layers": result.n_layers,
        "n_heads": result.n_heads,
        "stacks": {name: _stack_meta(stack) for name, stack in result.stacks.items()},
        "head_stats": {
            name: {stat: _json_matrix(values) for stat, values in stack.head_stats.items()}
            for name, stack in result.stacks.items()
        },
    }


def _stack_meta(stack: AttentionStack) -> dict[str, Any]:
    return {
        "query_tokens": list(stack.query_tokens),
        "key_tokens": list(stack.key_tokens),
        "n_layers": stack.n_layers,
        "n_heads": stack.n_heads,
        "has_neurons": stack.queries is not None and stack.keys is not None,
        "has_position_bias": stack.position_bias is not None,
        "score_scale": float(stack.score_scale),
    }


def _json_matrix(values: np.ndarray) -> list[list[float | None]]:
    """(layers, heads) -> nested lists, NaN -> None."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in values.tolist()]


def attention_parts(result: AttentionResult) -> Parts:
    """The arrays, float32, split into parts by stack and layer (see the module docstring)."""
    parts: Parts = {}
    for name, stack in result.stacks.items():
        for layer in range(stack.n_layers):
            parts[f"{name}.{layer}"] = {"attention": _f32(stack.attentions[layer])}
            if stack.queries is not None and stack.keys is not None:
                parts[f"{name}.{layer}.neurons"] = {
                    "queries": _f32(stack.queries[layer]),
                    "keys": _f32(stack.keys[layer]),
                }
        if stack.position_bias is not None:
            parts[f"{name}.position_bias"] = {"position_bias": _f32(stack.position_bias)}
    return parts


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def result_from_record(
    meta: Mapping[str, Any], parts: Mapping[str, Mapping[str, np.ndarray]]
) -> AttentionResult:
    """The AttentionResult that ``attention_meta`` and ``attention_parts`` came from."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Attention record format {version!r} is not supported (expected {FORMAT_VERSION})."
        )
    stacks = {
        name: _stack_from_record(name, stack_meta, meta["head_stats"][name], parts)
        for name, stack_meta in meta["stacks"].items()
    }
    return AttentionResult(
        model_name=meta["model_name"],
        architecture=meta["architecture"],
        text=meta["text"],
        pair=meta["pair"],
        tokens=list(meta["tokens"]),
        token_ids=[int(i) for i in meta["token_ids"]],
        sentence_b_start=meta["sentence_b_start"],
        stacks=stacks,
        n_layers=int(meta["n_layers"]),
        n_heads=int(meta["n_heads"]),
    )


def _stack_from_record(
    name: str,
    meta: Mapping[str, Any],
    stats: Mapping[str, Any],
    parts: Mapping[str, Mapping[str, np.ndarray]],
) -> AttentionStack:
    layers = range(int(meta["n_layers"]))
    neurons = (
        [_part(parts, f"{name}.{layer}.neurons") for layer in layers]
        if meta["has_neurons"]
        else None
    )
    bias = _part(parts, f"{name}.position_bias") if meta.get("has_position_bias") else None
    return AttentionStack(
        name=name,
        query_tokens=list(meta["query_tokens"]),
        key_tokens=list(meta["key_tokens"]),
        attentions=_stacked([_part(parts, f"{name}.{layer}") for layer in layers], "attention"),
        queries=None if neurons is None else _stacked(neurons, "queries"),
        keys=None if neurons is None else _stacked(neurons, "keys"),
        score_scale=float(meta["score_scale"]),
        head_stats={stat: _stat_array(stats[stat]) for stat in STAT_NAMES},
        position_bias=None if bias is None else _f32(bias["position_bias"]),
    )


def _part(parts: Mapping[str, Mapping[str, np.ndarray]], name: str) -> Mapping[str, np.ndarray]:
    if name not in parts:
        raise ValueError(f"The attention record has no part {name!r}.")
    return parts[name]


def _stacked(layers: list[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([np.asarray(layer[key], dtype=np.float32) for layer in layers])


def _stat_array(rows: list[list[float | None]]) -> np.ndarray:
    values = [[math.nan if v is None else v for v in row] for row in rows]
    return np.asarray(values, dtype=np.float32)  # (layers, heads)
