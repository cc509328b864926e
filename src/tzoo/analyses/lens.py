"""The logit lens and the tuned lens: what each layer of a decoder "would predict" if the
rest of the network were skipped.

For every layer l (0 = the embedding output, 1..L = each block's output) and position t,
the lens reads the residual stream ``h[l, t]`` through the model's own final norm and
unembedding: ``softmax(unembed(final_norm(h)))``. The tuned lens first maps ``h`` through
a learned affine translator (``tzoo.analyses.tuned_lens``).

The residuals come from ``tzoo.runtime.hooks``' residual stack, which is *unnormed* at every
layer, the last included. transformers' ``output_hidden_states`` ties its last entry to the
final-normed hidden state; applying the norm to that entry again is a common logit-lens bug.
Here the norm is applied exactly once everywhere, so layer L is the model's own output
distribution: the very computation its head does.

Memory: T positions x V vocabulary x (L + 1) layers of probabilities would be large
(SmolLM2, 512 tokens: 3 GB), so each layer is projected in row chunks and reduced at once
to its top-k, KL to the final distribution, entropy and the final token's rank.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from tzoo.analyses.attention import (
    EmptyInputError,
    InputTooLongError,
    _held,
    display_tokens,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import adapter_for, run_with_cache

if TYPE_CHECKING:
    from tzoo.analyses.tuned_lens import TunedLens

Tensor = torch.Tensor
LensKind = Literal["logit", "tuned"]
DEFAULT_MAX_TOKENS = 1024
LIMIT_SOURCE = "the lens's default; pass max_tokens for more"
LENS_RESULT_VERSION = 1
# Elements of the (rows, V) arrays projected at once: 24 MiB of float32. Staying below
# glibc's 32 MiB mmap threshold matters: larger blocks are mapped and unmapped on every
# allocation, and the page faults cost a third of the time on CPU.
_CHUNK_ELEMENTS = 6 * 2**20


class LensUnsupportedError(ValueError):
    """The model has no decoder stack with a final norm and an unembedding to read through."""


# -- results --------------------------------------------------------------------------------


@dataclass(eq=False)
class LensResult:
    """A lens over one input. Arrays run over ``layers`` (0 = the embedding output, l = the
    output of block l - 1; the last is the model's own output) and positions.

    ``final_token_rank[l, t]`` is the rank (0 = top) at layer l of the token the model's
    final distribution ranks first at position t, and ``final_probability`` its probability
    there; ``kl_to_final`` is KL(final || layer) in nats, so the last layer's is 0.
    """

    model_name: str
    text: str
    tokens: list[str]  # display strings, one per position
    token_ids: list[int]
    lens: LensKind
    layers: list[int]
    top_ids: np.ndarray  # (layers, T, k) int64, most probable first
    top_probs: np.ndarray  # (layers, T, k) float32
    kl_to_final: np.ndarray  # (layers, T) float32, nats
    entropy: np.ndarray  # (layers, T) float32, nats
    final_token_rank: np.ndarray  # (layers, T) int64
    final_probability: np.ndarray  # (layers, T) float32
    token_strings: dict[int, str]  # display string of every id in top_ids

    @property
    def n_layers(self) -> int:
        """Blocks in the model (``len(layers) - 1``)."""
        return len(self.layers) - 1

    @property
    def final_ids(self) -> np.ndarray:
        """(T,) the model's most probable next token at each position."""
        return self.top_ids[-1, :, 0]

    def to_dict(self, decimals: int = 5) -> dict[str, Any]:
        """JSON-safe: arrays as nested lists (layers, positions[, k]), floats rounded to
        ``decimals`` places (the page and API need no more; it halves the payload)."""

        def floats(a: np.ndarray) -> Any:
            return np.round(a.astype(np.float64), decimals).tolist()

        return {
            "version": LENS_RESULT_VERSION,
            "model": self.model_name,
            "lens": self.lens,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "layers": self.layers,
            "top_ids": self.top_ids.tolist(),
            "top_probs": floats(self.top_probs),
            "token_strings": {str(i): s for i, s in self.token_strings.items()},
            "kl_to_final": floats(self.kl_to_final),
            "entropy": floats(self.entropy),
            "final_token_rank": self.final_token_rank.tolist(),
            "final_probability": floats(self.final_probability),
        }

    def top_tokens(self, layer: int, position: int) -> list[tuple[str, float]]:
        """The top-k (token, probability) pairs at ``layer`` and ``position`` (negative
        indices count from the end)."""
        ids = self.top_ids[layer, position]
        probs = self.top_probs[layer, position]
        return [(self.token_strings[int(i)], float(p)) for i, p in zip(ids, probs, strict=True)]


# -- the analyses ---------------------------------------------------------------------------


def logit_lens(
    model: ModelHandle | str,
    text: str,
    *,
    k: int = 5,
    max_tokens: int | None = None,
    lens: TunedLens | None = None,
) -> LensResult:
    """The logit lens of ``model`` on ``text``: one forward pass, every layer x position.

    ``model``: a handle (the caller holds it, as ``tzoo.runtime.hooks.patch`` asks) or a
    name to load (its lock is then held during the pass). Decoder models only. ``k``: how
    many top tokens to keep. Input longer than ``max_tokens`` (default: the model's context,
    at most 1024) raises InputTooLongError; empty text raises EmptyInputError. ``lens``: a
    tuned lens to read through instead (see ``tuned_lens``).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    if not text or not text.strip():
        raise EmptyInputError("The text is empty; give the model something to read.")
    return logit_lens_batch(model, [text], k=k, max_tokens=max_tokens, lens=lens)[0]


def logit_lens_batch(
    model: ModelHandle | str,
    texts: Sequence[str],
    *,
    k: int = 5,
    max_tokens: int | None = None,
    lens: TunedLens | None = None,
) -> list[LensResult]:
    """``logit_lens`` of several texts in one padded forward pass, one result per text
    (what the job queue's dynamic batching runs). Padding goes on the right, so causal
    attention never lets a text see another's padding: each result matches its own
    ``logit_lens`` up to float rounding. The first empty or too long text raises."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    if not texts:
        return []
    for text in texts:
        if not text or not text.strip():
            raise EmptyInputError("The text is empty; give the model something to read.")
    with _held(model) as handle:
        readout = Readout.of(handle)
        if lens is not None:
            lens.check_compatible(handle)
        encoded = [_encode(handle, text, max_tokens) for text in texts]
        lengths = [len(ids) for ids in encoded]
        width = max(lengths)
        input_ids = torch.zeros((len(texts), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        stack = residual_stack(handle, input_ids, mask)  # (L + 1, B, T, d)
        # Only real positions are projected: (L + 1, sum of lengths, d).
        flat = torch.cat([stack[:, row, :n] for row, n in enumerate(lengths)], dim=1)
        arrays = _lens_arrays(readout, flat, lens, min(k, readout.vocab_size))
        tokenizer = handle.tokenizer
    results = []
    bounds = np.cumsum([0, *lengths])
    for text, ids, start, end in zip(texts, encoded, bounds[:-1], bounds[1:], strict=True):
        own = {name: array[:, start:end] for name, array in arrays.items()}
        seen = sorted({int(i) for i in np.unique(own["top_ids"])})
        results.append(
            LensResult(
                model_name=handle.name,
                text=text,
                tokens=display_tokens(tokenizer, ids),
                token_ids=ids,
                lens="logit" if lens is None else "tuned",
                layers=list(range(flat.shape[0])),
                token_strings=dict(zip(seen, display_tokens(tokenizer, seen), strict=True)),
                **own,
            )
        )
    return results


def count_tokens(handle: ModelHandle, text: str, max_tokens: int | None = None) -> int:
    """How many tokens ``text`` is for the lens; EmptyInputError or InputTooLongError as
    ``logit_lens`` would raise them (the job queue checks each request before batching)."""
    if not text or not text.strip():
        raise EmptyInputError("The text is empty; give the model something to read.")
    return len(_encode(handle, text, max_tokens))


def tuned_lens(
    model: ModelHandle | str,
    text: str,
    *,
    lens: TunedLens | str | Path | None = None,
    k: int = 5,
    max_tokens: int | None = None,
) -> LensResult:
    """The tuned lens of ``model`` on ``text``: as ``logit_lens``, with each layer's
    residual first mapped through the lens's translator (``h + A h + b``).

    ``lens``: a TunedLens, a directory it was saved to, or None for the one trained with
    ``tzoo lens train`` (``TZOO_TUNED_LENS_DIR/<model>``). A lens trained for another model
    (name, width or depth) is refused with LensMismatchError.
    """
    from tzoo.analyses.tuned_lens import TunedLens, default_lens_dir

    with _held(model) as handle:
        if not isinstance(lens, TunedLens):
            lens = TunedLens.load(default_lens_dir(handle.name) if lens is None else Path(lens))
        return logit_lens(handle, text, k=k, max_tokens=max_tokens, lens=lens)


# -- reading the residual stream ------------------------------------------------------------


@dataclass(frozen=True)
class Readout:
    """A decoder's final norm and unembedding: ``logits = unembed(norm(h))``."""

    norm: nn.Module | None  # None for a decoder whose blocks end normed
    unembed: nn.Module
    n_layers: int
    d_model: int
    vocab_size: int

    @classmethod
    def of(cls, handle: ModelHandle) -> Readout:
        """The readout of ``handle``'s decoder, or LensUnsupportedError."""
        model = handle.model
        adapter = adapter_for(model)
        unembed = adapter.unembedding(model)
        if handle.architecture != "decoder" or unembed is None:
            raise LensUnsupportedError(
                f"A lens needs a decoder with an unembedding; {handle.name} is "
                f"{'an' if handle.architecture[0] in 'ae' else 'a'} {handle.architecture} "
                "model."
            )
        weight = getattr(unembed, "weight", None)
        vocab = int(weight.shape[0]) if isinstance(weight, Tensor) else handle.vocab_size
        return cls(
            norm=adapter.final_norm(model, "decoder"),
            unembed=unembed,
            n_layers=len(adapter.blocks(model, "decoder")),
            d_model=handle.d_model,
            vocab_size=vocab,
        )

    @property
    def chunk_rows(self) -> int:
        """How many positions to project at once (see ``_CHUNK_ELEMENTS``)."""
        return max(1, _CHUNK_ELEMENTS // self.vocab_size)

    def logits(self, h: Tensor) -> Tensor:
        """(..., V) float32 logits of residuals ``h`` (..., d)."""
        normed = h if self.norm is None else self.norm(h)
        return self.unembed(normed).float()


def residual_stack(
    handle: ModelHandle, input_ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """``(L + 1, batch, T, d)``: the unnormed residual stream of ``input_ids`` (batch, T),
    from one forward pass under no_grad (the model's own head runs on the last position
    only, where the model allows it: the lens computes every position's logits itself).
    ``attention_mask``: 0 marks right padding (default: none)."""
    model = handle.model
    extra: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    _, cache = run_with_cache(
        handle,
        inputs,
        sites=["resid_pre", "resid_post"],
        stacks="decoder",
        attentions=False,
        **extra,
    )
    return cache.residual_stack("decoder")


def _encode(handle: ModelHandle, text: str, max_tokens: int | None) -> list[int]:
    ids = [int(i) for i in handle.tokenizer(text)["input_ids"]]
    if not ids:
        raise EmptyInputError("The text gave no tokens; give the model something to read.")
    config = handle.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1; got {max_tokens}.")
    limit, source = (max_tokens, "max_tokens") if max_tokens else (DEFAULT_MAX_TOKENS, LIMIT_SOURCE)
    if isinstance(context, int) and context < limit:
        limit, source = context, "the model's context length"
    if len(ids) > limit:
        raise InputTooLongError(len(ids), limit, source)
    return ids


@torch.no_grad()
def _lens_arrays(
    readout: Readout, stack: Tensor, lens: TunedLens | None, k: int
) -> dict[str, np.ndarray]:
    """Top-k, KL to the final layer, entropy and the final token's rank for every layer of
    ``stack`` (L + 1, T, d).

    About ``chunk_rows`` (layer, position) rows are projected per matrix product, so only
    a few (rows, V) arrays live at once. Positions go in chunks of up to ``chunk_rows``;
    when a chunk is short, several layers share one product: a product of a few rows
    reads the whole unembedding for little work (memory-bound), so a 10-token text would
    otherwise pay for 31 full reads of it."""
    n_layers, n_positions = stack.shape[0], stack.shape[1]
    budget = readout.chunk_rows
    chunks = []
    for start in range(0, n_positions, budget):
        part = stack[:, start : start + budget]  # (L + 1, P, d)
        final = _Final.of(torch.log_softmax(readout.logits(part[-1]), dim=-1))  # (P, V)
        group = max(1, budget // part.shape[1])  # layers per product
        pieces = []
        for first in range(0, n_layers, group):
            layers = range(first, min(first + group, n_layers))
            log_q = _log_q_layers(readout, lens, part, layers, final)  # (g, P, V)
            pieces.append(_reduce(log_q, final, k))
        chunks.append({name: torch.cat([p[name] for p in pieces]) for name in pieces[0]})
    return {
        name: torch.cat([chunk[name] for chunk in chunks], dim=1).cpu().numpy()
        for name in chunks[0]
    }


def _log_q_layers(
    readout: Readout, lens: TunedLens | None, part: Tensor, layers: range, final: _Final
) -> Tensor:
    """(g, P, V) log-probabilities of ``layers`` of ``part`` (L + 1, P, d), in one product.
    The last layer is the model's own output (a tuned lens leaves it as it is)."""
    last = part.shape[0] - 1
    if layers.start == last:
        return final.log_p.unsqueeze(0)
    own = [layer for layer in layers if layer != last]
    h = part[own[0] : own[-1] + 1]
    if lens is not None:
        h = torch.stack([lens(h[i], layer) for i, layer in enumerate(own)])
    log_q = torch.log_softmax(readout.logits(h), dim=-1)
    if layers.stop - 1 == last:
        log_q = torch.cat([log_q, final.log_p.unsqueeze(0)])
    return log_q


@torch.no_grad()
def kl_to_final(readout: Readout, stack: Tensor, lens: TunedLens | None = None) -> Tensor:
    """(L + 1, N) KL(final || layer) in nats for residuals ``stack`` (L + 1, N, d), through
    ``lens`` when given: the ``kl_to_final`` of ``logit_lens`` alone, in position chunks."""
    chunks = []
    for start in range(0, stack.shape[1], readout.chunk_rows):
        part = stack[:, start : start + readout.chunk_rows]  # (L + 1, rows, d)
        final = _Final.of(torch.log_softmax(readout.logits(part[-1]), dim=-1))
        kls = [
            final.sum_p_log_p - torch.linalg.vecdot(final.p, _log_q(readout, lens, h, layer))
            for layer, h in enumerate(part[:-1])
        ]
        chunks.append(torch.stack([*kls, torch.zeros_like(final.sum_p_log_p)]).clamp_min(0.0))
    return torch.cat(chunks, dim=1)


def _log_q(readout: Readout, lens: TunedLens | None, h: Tensor, layer: int) -> Tensor:
    return torch.log_softmax(readout.logits(h if lens is None else lens(h, layer)), dim=-1)


@dataclass(frozen=True)
class _Final:
    """The model's own distribution at some positions, and what every layer compares to."""

    log_p: Tensor  # (rows, V)
    p: Tensor  # (rows, V)
    ids: Tensor  # (rows, 1) its most probable token
    sum_p_log_p: Tensor  # (rows,) minus its entropy

    @classmethod
    def of(cls, log_p: Tensor) -> _Final:
        p = log_p.exp()
        return cls(log_p, p, log_p.argmax(-1, keepdim=True), torch.linalg.vecdot(p, log_p))


def _reduce(log_q: Tensor, final: _Final, k: int) -> dict[str, Tensor]:
    """The statistics of log-probabilities ``log_q`` (..., P, V), each layer's against the
    final distribution at the same P positions. Each is one pass over ``log_q``: the KL
    is sum p log p - sum p log q, with the first sum shared by all layers (exactly 0 at
    the last layer, where log_q is log_p)."""
    top = log_q.topk(k, dim=-1)
    final_log_q = log_q.gather(-1, final.ids.expand(*log_q.shape[:-1], 1))  # (..., P, 1)
    kl = final.sum_p_log_p - torch.linalg.vecdot(final.p, log_q)
    return {
        "top_ids": top.indices.long(),
        "top_probs": top.values.exp(),
        "kl_to_final": kl.clamp_min(0.0),  # >= 0; rounding may dip below when nearly equal
        "entropy": -torch.linalg.vecdot(log_q.exp(), log_q),
        # int32 sum: summing booleans into int64 is several times slower here.
        "final_token_rank": (log_q > final_log_q).sum(-1, dtype=torch.int32).long(),
        "final_probability": final_log_q.squeeze(-1).exp(),
    }
