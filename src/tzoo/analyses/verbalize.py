"""Activations in words: Patchscope verbalisation (Ghandeharioun et al., 2024).

The residual stream ``h`` of the source text at (source layer, position) is written into a
few-shot identity prompt, ``"cat -> cat; 1135 -> 1135; hello -> hello; ?"``, in place of
the residual at the target layer at the placeholder (the prompt's last token, ``" ?"``);
the model then continues greedily and its continuation, up to the first ``;`` or newline,
is the explanation: what the model "reads" in ``h`` when asked to repeat it.

Layers are numbered as the hooks number blocks: layer ``L`` is ``decoder.L.resid_post``,
the (unnormed) residual after block ``L``; negative numbers count from the end.

The work per call:

1. One forward pass over the source text records the source layer's residual at every
   position (and gives the model's own next-token distributions and the logit lens).
2. The identity prompt's tokens before the placeholder are run once (batch of one) into
   a key/value cache: the patch cannot change them, attention being causal.
3. The target runs are batched: ``batch_size`` rows, each the placeholder on a copy of
   that cache, row ``i`` patched with position ``i``'s vector. The patch is installed
   for that pass only; the greedy continuation then reuses the key/value cache, so the
   placeholder is never recomputed and no hook sees the one-token steps. Generation
   stops once every row's explanation has ended.
4. ``progress(done, total)`` after each batch; ``should_stop()`` before each batch: when
   it says True, the rows computed so far come back with ``complete=False``.
"""

from __future__ import annotations

import copy
import html
import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tzoo.analyses.attention import EmptyInputError, InputTooLongError, display_tokens
from tzoo.config import get_settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import adapter_for, patch, run_with_cache

Tensor = torch.Tensor
DEFAULT_IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"
LENS_TOP_K = 5
RESULT_VERSION = 1
LIMIT_SETTING = "TZOO_ATTENTION_MAX_TOKENS"
_ARROW = "->"  # the identity prompt's separator, which a continuation usually starts with
_STOPS = (";", "\n")


class NotADecoderError(ValueError):
    """Verbalisation needs a decoder-only language model (it generates text)."""


# -- results --------------------------------------------------------------------------------


@dataclass
class VerbalizeRow:
    """One source position, in words.

    - ``explanation``: the patched identity prompt's greedy continuation, with a leading
      ``"->"`` removed, cut at the first ``;`` or newline (or end-of-sequence token) and
      stripped of surrounding whitespace.
    - ``kl``: KL(p || q) in nats, where p is the model's own next-token distribution at
      this position of the source text (its final output, softmax of the logits) and q
      the patched target's first-step next-token distribution (the output at the
      placeholder, the distribution the first continuation token is taken from). Low at
      late layers, where ``h`` already carries the model's prediction.
    - ``entropy``: of q, in nats.
    - ``lens_top``: the logit lens at the source layer and position, final norm then
      unembedding of ``h``: the top 5 (token, probability).
    """

    position: int
    token: str
    explanation: str
    kl: float
    entropy: float
    lens_top: list[tuple[str, float]]


@dataclass
class VerbalizeResult:
    """Patchscope explanations of ``text``'s positions; ``tokens`` are all of the text's
    tokens, ``rows`` the positions computed (all asked for when ``complete``)."""

    model_name: str
    text: str
    tokens: list[str]
    source_layer: int
    target_layer: int
    identity_prompt: str
    max_new_tokens: int
    rows: list[VerbalizeRow] = field(default_factory=list)
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (str, int, float, bool, lists, dicts); ``lens_top`` pairs as lists."""
        data = asdict(self)
        for row in data["rows"]:
            row["lens_top"] = [[token, float(p)] for token, p in row["lens_top"]]
        return {"version": RESULT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerbalizeResult:
        """The result ``to_dict`` gave (after a JSON round trip too)."""
        if data.get("version") != RESULT_VERSION:
            raise ValueError(f"Unknown verbalize result version {data.get('version')!r}.")
        fields = {k: v for k, v in data.items() if k not in ("version", "rows")}
        rows = [
            VerbalizeRow(**{**row, "lens_top": [(str(t), float(p)) for t, p in row["lens_top"]]})
            for row in data["rows"]
        ]
        return cls(**fields, rows=rows)

    def _repr_html_(self) -> str:
        return _table_html(self)


def _table_html(result: VerbalizeResult) -> str:
    def lens(row: VerbalizeRow) -> str:
        return ", ".join(f"{html.escape(repr(t))} {p:.2f}" for t, p in row.lens_top)

    rows = "".join(
        f"<tr><td>{row.position}</td><td>{html.escape(repr(row.token))}</td>"
        f"<td>{html.escape(row.explanation)}</td><td>{row.kl:.3f}</td>"
        f"<td>{row.entropy:.3f}</td><td>{lens(row)}</td></tr>"
        for row in result.rows
    )
    partial = "" if result.complete else " (stopped early: partial result)"
    return (
        f"<p><b>{html.escape(result.model_name)}</b>: layer {result.source_layer} read at "
        f"layer {result.target_layer} of {html.escape(repr(result.identity_prompt))}"
        f"{partial}</p><table><tr><th>position</th><th>token</th><th>explanation</th>"
        f"<th>KL (nats)</th><th>entropy (nats)</th><th>logit lens</th></tr>{rows}</table>"
    )


# -- the analysis ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What the pass over the source text gives, at the chosen positions, and the modules
    that read a residual as a next-token distribution (the logit lens)."""

    residual: Tensor  # (P, d_model), the source layer's resid_post
    logits: Tensor  # (P, V), the model's own next-token logits
    norm: nn.Module | None  # the final norm; None where the blocks end normed
    unembedding: nn.Module

    def lens_top(self, rows: slice) -> tuple[Tensor, Tensor]:
        """The logit lens's top tokens at ``rows``: ids and probabilities, each (B, k)."""
        residual = self.residual[rows]  # (B, d_model)
        normed = residual if self.norm is None else self.norm(residual)
        probs = torch.softmax(self.unembedding(normed).double(), dim=-1)  # (B, V)
        top = probs.topk(min(LENS_TOP_K, probs.shape[-1]), dim=-1)
        return top.indices, top.values


@dataclass(frozen=True)
class _Runs:
    """One batch of patched target runs."""

    first_log_probs: Tensor  # (B, V) float64, next-token distribution at the placeholder
    continuations: list[list[int]]  # generated ids per row, up to an explanation's end


def verbalize(
    model: ModelHandle | str,
    text: str,
    *,
    layer: int,
    target_layer: int | None = None,
    positions: Sequence[int] | None = None,
    identity_prompt: str = DEFAULT_IDENTITY_PROMPT,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_rows: Callable[[list[VerbalizeRow]], None] | None = None,
    max_tokens: int | None = None,
) -> VerbalizeResult:
    """Explain in words what the residual stream of ``text`` holds after block ``layer``,
    position by position (see the module docstring for the method).

    ``model``: a handle or a name to load; its lock is held throughout (hooks see every
    forward pass on the shared model). ``target_layer``: where the vector is written in
    the identity prompt (default: ``layer``). ``positions``: token positions of ``text``
    (negative ones count from the end; default: all), rows come in this order, repeats
    dropped. The identity prompt's last token is the placeholder. ``progress(done,
    total)`` and ``on_rows(rows)`` are called after every batch (``on_rows`` with that
    batch's rows, for streaming); ``should_stop()`` is asked before each batch, and a true
    answer returns the rows so far with ``complete=False``.

    Errors (all ValueError): EmptyInputError for empty text, InputTooLongError past
    ``max_tokens`` (default: the ``attention_max_tokens`` setting) or the model's context,
    NotADecoderError for encoders, and plain ValueErrors naming the valid range for a bad
    layer, position or count.
    """
    if not text or not text.strip():
        raise EmptyInputError("The text is empty; give the model something to read.")
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("batch_size", batch_size)
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens)
    handle = _handle_of(model)
    with handle.lock:
        _require_decoder(handle)
        source_layer = _layer_index(handle, layer, "layer")
        target = source_layer if target_layer is None else target_layer
        target = _layer_index(handle, target, "target_layer")
        limit = _token_limit(handle, max_tokens)
        ids = _encode(handle, text, limit)
        prompt_ids = _identity_ids(handle, identity_prompt, max_new_tokens, limit[0])
        chosen = _positions(positions, len(ids))
        source = _read_source(handle, ids, source_layer, chosen)
        prompt = _Prompt.of(handle, prompt_ids)
        tokens = display_tokens(handle.tokenizer, ids)
        result = VerbalizeResult(
            model_name=handle.name,
            text=text,
            tokens=tokens,
            source_layer=source_layer,
            target_layer=target,
            identity_prompt=identity_prompt,
            max_new_tokens=max_new_tokens,
        )
        for start in range(0, len(chosen), batch_size):
            if should_stop is not None and should_stop():
                result.complete = False
                break
            batch = slice(start, start + batch_size)
            runs = _patched_runs(handle, prompt, target, source.residual[batch], max_new_tokens)
            rows = _rows(handle, source, batch, runs, chosen[batch], tokens)
            result.rows += rows
            if on_rows is not None:
                on_rows(rows)
            if progress is not None:
                progress(len(result.rows), len(chosen))
    return result


def _rows(
    handle: ModelHandle,
    source: _Source,
    batch: slice,
    runs: _Runs,
    positions: list[int],
    tokens: list[str],
) -> list[VerbalizeRow]:
    """The rows of one batch: ``batch`` selects them in ``source``, ``runs`` has them in
    the same order."""
    with torch.no_grad():
        p = torch.log_softmax(source.logits[batch].double(), dim=-1)  # (B, V) model's own
        q = runs.first_log_probs  # (B, V), the patched first step
        kl = (p.exp() * (p - q)).sum(dim=-1).tolist()  # (B,)
        entropy = (-(q.exp() * q).sum(dim=-1)).tolist()  # (B,)
        lens_ids, lens_probs = source.lens_top(batch)  # (B, k) each
    rows = []
    for i, position in enumerate(positions):
        names = display_tokens(handle.tokenizer, lens_ids[i].tolist())
        rows.append(
            VerbalizeRow(
                position=position,
                token=tokens[position],
                explanation=explanation_of(_decode(handle, runs.continuations[i])),
                kl=float(kl[i]),
                entropy=float(entropy[i]),
                lens_top=list(zip(names, lens_probs[i].tolist(), strict=True)),
            )
        )
    return rows


def explanation_of(continuation: str) -> str:
    """The explanation in a continuation: a leading ``"->"`` (the identity prompt's
    separator, which the model usually writes first) removed, cut at the first ``;`` or
    newline, whitespace stripped. ``" -> Paris; hello"`` -> ``"Paris"``."""
    body = _after_arrow(continuation)
    for stop in _STOPS:
        body = body.split(stop, 1)[0]
    return body.strip()


def _after_arrow(continuation: str) -> str:
    body = continuation.lstrip(" \t")
    return body[len(_ARROW) :] if body.startswith(_ARROW) else body


def _finished(continuation: str) -> bool:
    """Whether a continuation already holds its whole explanation (a stop after it)."""
    return any(stop in _after_arrow(continuation) for stop in _STOPS)


# -- the two kinds of forward pass ----------------------------------------------------------


def _read_source(handle: ModelHandle, ids: list[int], layer: int, chosen: list[int]) -> _Source:
    """One pass over the source text: the layer's residual and the model's own next-token
    logits at the chosen positions."""
    model = handle.model
    adapter = adapter_for(handle)
    unembedding = adapter.unembedding(model)
    if unembedding is None:
        raise NotADecoderError(f"{handle.name} has no language-model head to read with.")
    inputs = {"input_ids": _ids_tensor([ids]), "attention_mask": _ids_tensor([[1] * len(ids)])}
    outputs, cache = run_with_cache(
        handle, inputs, sites=["resid_post"], stacks=["decoder"], layers=[layer], attentions=False
    )
    where = torch.tensor(chosen, dtype=torch.long, device=outputs.logits.device)
    return _Source(
        residual=cache[f"decoder.{layer}.resid_post"][0, where],  # (P, d_model)
        logits=outputs.logits[0, where],  # (P, V)
        norm=adapter.final_norm(model, "decoder"),
        unembedding=unembedding,
    )


@dataclass(frozen=True)
class _Prompt:
    """The identity prompt's ids and the key/value cache of every token before the
    placeholder (batch of one), computed once per call: the patch cannot change them
    (attention is causal), so each batch runs the placeholder alone on a copy of it."""

    ids: list[int]
    prefix_cache: Any  # None: no prefix, or a cache that cannot be copied per batch

    @classmethod
    def of(cls, handle: ModelHandle, ids: list[int]) -> _Prompt:
        if len(ids) < 2:
            return cls(ids, None)
        prefix = _ids_tensor([ids[:-1]]).to(handle.device)  # (1, T - 1)
        with torch.no_grad():
            cache = handle.model(input_ids=prefix, use_cache=True, **_last_only(handle.model))
        past = cache.past_key_values
        return cls(ids, past if hasattr(past, "batch_repeat_interleave") else None)

    def start(self, n_rows: int) -> tuple[list[int], Any]:
        """The ids to run and the cache to run them on, for a batch of ``n_rows``."""
        if self.prefix_cache is None:
            return self.ids, None  # the whole prompt
        past = copy.deepcopy(self.prefix_cache)
        past.batch_repeat_interleave(n_rows)  # (1, ...) -> (B, ...) in every layer
        return self.ids[-1:], past


def _patched_runs(
    handle: ModelHandle,
    prompt: _Prompt,
    target_layer: int,
    vectors: Tensor,
    max_new_tokens: int,
) -> _Runs:
    """Greedy continuations of the identity prompt, one row per vector (B, d_model), each
    row's residual after block ``target_layer`` at the placeholder replaced by its vector.

    The patch is installed around the placeholder's pass only: the one-token steps after
    it read the placeholder from the key/value cache, which already holds the patched
    state, and no hook of ours sees them. Generation stops early once every row's
    explanation is complete.
    """
    model = handle.model
    n_rows = vectors.shape[0]
    ids, cache = prompt.start(n_rows)
    input_ids = _ids_tensor([ids] * n_rows).to(handle.device)  # (B, t): the placeholder last

    def write(x: Tensor) -> Tensor:  # (B, t, d_model)
        if x.shape[:2] != input_ids.shape:
            raise RuntimeError(
                f"The patch saw {tuple(x.shape)}; it belongs to the placeholder's pass."
            )
        x = x.clone()
        x[:, -1, :] = vectors.to(x.dtype)
        return x

    with torch.no_grad():
        with patch(handle, {f"decoder.{target_layer}.resid_post": write}):
            out = model(
                input_ids=input_ids, past_key_values=cache, use_cache=True, **_last_only(model)
            )
        first = torch.log_softmax(out.logits[:, -1].double(), dim=-1)  # (B, V)
        next_ids = first.argmax(dim=-1)  # (B,)
        generated = [next_ids]
        cache = out.past_key_values
        for _ in range(max_new_tokens - 1):
            if _all_finished(handle, generated):
                break
            out = model(input_ids=next_ids[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_ids = out.logits[:, -1].argmax(dim=-1)  # (B,)
            generated.append(next_ids)
    columns = torch.stack(generated, dim=1).cpu()  # (B, steps)
    return _Runs(first, [_until_eos(handle, row) for row in columns.tolist()])


def _all_finished(handle: ModelHandle, generated: list[Tensor]) -> bool:
    rows = torch.stack(generated, dim=1).tolist()  # (B, steps)
    return all(
        len(_until_eos(handle, row)) < len(row) or _finished(_decode(handle, row)) for row in rows
    )


def _until_eos(handle: ModelHandle, ids: list[int]) -> list[int]:
    eos = _eos_ids(handle)
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


def _eos_ids(handle: ModelHandle) -> set[int]:
    found: set[int] = set()
    for value in (
        getattr(handle.tokenizer, "eos_token_id", None),
        getattr(getattr(handle.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, int))
    return found


def _decode(handle: ModelHandle, ids: list[int]) -> str:
    return str(handle.tokenizer.decode(ids, skip_special_tokens=True))


def _last_only(model: torch.nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only (saves a (B, T, V) tensor) when supported."""
    accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}


# -- inputs and checks ----------------------------------------------------------------------


def _handle_of(model: ModelHandle | str) -> ModelHandle:
    if isinstance(model, ModelHandle):
        return model
    from tzoo.api import load_model

    return load_model(model)


def _require_decoder(handle: ModelHandle) -> None:
    if handle.architecture != "decoder":
        raise NotADecoderError(
            f"Verbalisation needs a decoder-only language model; {handle.name} is an "
            f"{handle.architecture} model."
        )


def _layer_index(handle: ModelHandle, layer: int, name: str) -> int:
    n = handle.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(
            f"{name} must be an integer from {-n} to {n - 1} ({handle.name} has {n} "
            f"layers; negative numbers count from the end); got {layer!r}."
        )
    return layer % n


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _positions(positions: Sequence[int] | None, n_tokens: int) -> list[int]:
    if positions is None:
        return list(range(n_tokens))
    if not positions:
        raise ValueError("positions is empty; pass None for every position.")
    chosen: list[int] = []
    for position in positions:
        ok = isinstance(position, int) and not isinstance(position, bool)
        if not ok or not -n_tokens <= position < n_tokens:
            raise ValueError(
                f"positions must be integers from {-n_tokens} to {n_tokens - 1} (the text "
                f"has {n_tokens} tokens); got {position!r}."
            )
        if position % n_tokens not in chosen:
            chosen.append(position % n_tokens)
    return chosen


def _token_limit(handle: ModelHandle, max_tokens: int | None) -> tuple[int, str]:
    limit = max_tokens if max_tokens is not None else get_settings().attention_max_tokens
    config = handle.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if isinstance(context, int) and context < limit:
        return context, "the model's context length"
    return limit, LIMIT_SETTING if max_tokens is None else "max_tokens"


def _encode(handle: ModelHandle, text: str, limit: tuple[int, str]) -> list[int]:
    ids = [int(i) for i in handle.tokenizer(text)["input_ids"]]
    if not ids:
        raise EmptyInputError("The text gave no tokens; give the model something to read.")
    if len(ids) > limit[0]:
        raise InputTooLongError(len(ids), *limit)
    return ids


def _identity_ids(handle: ModelHandle, prompt: str, max_new_tokens: int, limit: int) -> list[int]:
    if not prompt or not prompt.strip():
        raise ValueError(
            "identity_prompt is empty; its last token is where the vector goes, e.g. "
            f"{DEFAULT_IDENTITY_PROMPT!r}."
        )
    ids = [int(i) for i in handle.tokenizer(prompt)["input_ids"]]
    if len(ids) + max_new_tokens > limit:
        raise ValueError(
            f"The identity prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the limit of {limit} tokens."
        )
    return ids


def _ids_tensor(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)  # (B, T)
