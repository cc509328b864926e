"""Attention visualizations: compute (or reuse a cached computation), store, read back.

The web routes, the CLI's ``--share`` and any other front door call these functions; none
of them computes tensors or writes rows itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy.orm import Session

from tzoo.analyses.attention import attention
from tzoo.analyses.attention_record import attention_meta, attention_parts
from tzoo.config import Settings
from tzoo.runtime.manager import ModelManager
from tzoo.service.result_cache import CachedResult, ResultCache, cache_key
from tzoo.store.artefacts import create_artefact
from tzoo.store.models import Artefact

KIND = "attention"
ViewType = Literal["head", "model", "neuron"]
VIEW_TYPES: tuple[str, ...] = ("head", "model", "neuron")
RECORD_VERSION = 1


@dataclass(frozen=True)
class VisualizationRequest:
    model_name: str
    text: str
    pair: str | None = None
    view_type: ViewType = "head"
    visibility: str = "public"
    owner: str | None = None


def compute_attention_record(
    manager: ModelManager,
    cache: ResultCache,
    settings: Settings,
    *,
    model_name: str,
    text: str,
    pair: str | None,
) -> tuple[str, CachedResult]:
    """(canonical model name, meta + parts), from the cache when the same input was seen."""
    with manager.use(model_name, exclusive=True) as handle:
        key = cache_key(
            KIND,
            handle.name,
            text=text,
            pair=pair,
            max_tokens=settings.attention_max_tokens,
            version=RECORD_VERSION,
        )
        cached = cache.get(key)
        if cached is not None:
            return handle.name, cached
        result = attention(handle, text, pair, max_tokens=settings.attention_max_tokens)
        record = CachedResult(attention_meta(result), attention_parts(result))
    cache.set(key, record)
    return handle.name, record


def create_visualization(
    session: Session,
    manager: ModelManager,
    cache: ResultCache,
    settings: Settings,
    request: VisualizationRequest,
) -> Artefact:
    """Compute the attention of ``request.text`` and keep it at a new permanent slug."""
    model_name, record = compute_attention_record(
        manager,
        cache,
        settings,
        model_name=request.model_name,
        text=request.text,
        pair=request.pair,
    )
    meta = record.meta
    params: dict[str, Any] = {
        "view_type": request.view_type,
        "pair": request.pair,
        "n_layers": meta["n_layers"],
        "n_heads": meta["n_heads"],
        "n_tokens": len(meta["tokens"]),
        "meta": meta,
    }
    return create_artefact(
        session,
        kind=KIND,
        model_name=model_name,
        input_text=request.text,
        params=params,
        arrays={"token_ids": np.asarray(meta["token_ids"], dtype=np.int64)},
        parts=record.parts,
        precision="float16",
        owner=request.owner,
        visibility=request.visibility,
    )


def stack_layer_part(artefact: Artefact, stack: str, layer: int, *, neurons: bool = False) -> str:
    """The part name holding one layer of a stack, after checking both exist.

    Raises LookupError with a sentence naming what does exist.
    """
    meta = artefact.params["meta"]
    stacks = meta["stacks"]
    if stack not in stacks:
        raise LookupError(f"No stack {stack!r}; this visualization has {', '.join(stacks)}.")
    n_layers = stacks[stack]["n_layers"]
    if not 0 <= layer < n_layers:
        raise LookupError(f"Layer {layer} does not exist; {stack} has layers 0 to {n_layers - 1}.")
    if neurons and not stacks[stack].get("has_neurons"):
        raise LookupError(f"The {stack} stack has no query/key vectors for the neuron view.")
    return f"{stack}.{layer}.neurons" if neurons else f"{stack}.{layer}"


def default_stack(artefact: Artefact) -> str:
    stacks = artefact.params["meta"]["stacks"]
    return "decoder" if "decoder" in stacks and len(stacks) == 1 else next(iter(stacks))


def stack_bias_part(artefact: Artefact, stack: str) -> str:
    """The part name holding a stack's position bias (T5), after checking it has one.

    Raises LookupError with a sentence saying why not.
    """
    stacks = artefact.params["meta"]["stacks"]
    if stack not in stacks:
        raise LookupError(f"No stack {stack!r}; this visualization has {', '.join(stacks)}.")
    if not stacks[stack].get("has_position_bias"):
        raise LookupError(
            f"The {stack} stack has no position bias: its scores are the scaled q·k alone."
        )
    return f"{stack}.position_bias"


def view_arrays(
    parts: dict[str, dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split stored parts into what the views read: attention by ``stack.layer`` (heads, Tq,
    Tk), for self-attention stacks stacked queries and keys (2, heads, T, d_head) by the
    same name, and T5's position bias by stack (heads, Tq, Tk).

    The standalone export does the splitting (it is pure numpy and needs it without a
    database); this is the same function for the service's callers.
    """
    from tzoo.web.standalone import split_parts

    return split_parts(parts)


def load_all_parts(session: Session, artefact: Artefact) -> dict[str, dict[str, np.ndarray]]:
    """Every part of an artefact, decoded (for exports; the views load one layer at a time)."""
    from tzoo.store.artefacts import load_part, part_names

    parts = {}
    for name in part_names(session, artefact):
        arrays = load_part(session, artefact, name)
        if arrays is not None:
            parts[name] = arrays
    return parts
