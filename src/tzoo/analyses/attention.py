"""The attention explorer's analysis: attention weights, query/key vectors and per-head
statistics for one input (a batch of one), from any model the hooks layer supports.

Attention weights come from ``tzoo.runtime.hooks.run_with_cache`` (transformers' own eager
attention, every query head even under grouped-query attention). The query and key vectors
for the neuron view are read during the same forward pass by forward hooks on each
attention module's projections, taken as the score uses them: after rotary embedding for
llama, key/value heads repeated to every query head, not yet scaled. For every stack::

    softmax(score_scale * queries @ keys.T + position_bias + mask) == attentions

where ``mask`` is the causal mask for the ``"decoder"`` stack and nothing otherwise (one
unpadded sequence), and ``position_bias`` is None (zero) except for T5.

T5 and the neuron view: T5 does not scale its scores (``score_scale`` is 1.0) and adds a
learned relative-position bias, computed once by the first block of each stack and reused
by every layer. The queries and keys are exact, and ``position_bias`` (heads, Tq, Tk) is
kept on the encoder and decoder stacks, so the formula above holds exactly; what the
q·k products alone cannot show for T5 is the part of a head's pattern that comes from
position (a head may attend to the previous token through the bias alone). Cross-attention
has no position bias.
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tzoo.config import get_settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import ActivationCache, adapter_for, run_with_cache

Tensor = torch.Tensor
STAT_NAMES = ("entropy", "mean_distance", "sink", "previous_token", "induction")
LIMIT_SETTING = "TZOO_ATTENTION_MAX_TOKENS"


class InputTooLongError(ValueError):
    """The input has more tokens than the attention explorer accepts; nothing is truncated."""

    def __init__(self, n_tokens: int, limit: int, source: str = LIMIT_SETTING) -> None:
        super().__init__(f"The input is {n_tokens} tokens; the limit is {limit} ({source}).")
        self.n_tokens = n_tokens
        self.limit = limit
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (process pools, Ray)
        return (type(self), (self.n_tokens, self.limit, self.source))


class EmptyInputError(ValueError):
    """The text to analyse is empty."""


class NoPrimaryStackError(AttributeError, ValueError):
    """An encoder-decoder result has three stacks and no single ``attentions``."""


# -- results --------------------------------------------------------------------------------


@dataclass(eq=False)
class AttentionStack:
    """One attention stack: ``"encoder"``, ``"decoder"`` (self-attention) or ``"cross"``
    (T5's decoder reading the encoder: queries from the decoder, keys from the encoder).

    Arrays are float32. ``queries``/``keys`` are None when not requested or when no reader
    exists for the model type (``score_scale`` is then 1.0 and means nothing);
    ``position_bias`` is T5's relative bias shared by all layers
    of the stack. ``head_stats``: see ``head_statistics``.
    """

    name: str
    query_tokens: list[str]
    key_tokens: list[str]
    attentions: np.ndarray  # (layers, heads, Tq, Tk)
    queries: np.ndarray | None  # (layers, heads, Tq, d_head)
    keys: np.ndarray | None  # (layers, heads, Tk, d_head)
    score_scale: float
    head_stats: dict[str, np.ndarray]  # each (layers, heads)
    position_bias: np.ndarray | None = None  # (heads, Tq, Tk)

    @property
    def causal(self) -> bool:
        """Whether a query sees only itself and earlier positions (decoder self-attention)."""
        return self.name == "decoder"

    @property
    def n_layers(self) -> int:
        return int(self.attentions.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.attentions.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttentionStack):
            return NotImplemented
        scalars = ("name", "query_tokens", "key_tokens", "score_scale")
        arrays = ("attentions", "queries", "keys", "position_bias")
        return (
            all(getattr(self, n) == getattr(other, n) for n in scalars)
            and all(_same_array(getattr(self, n), getattr(other, n)) for n in arrays)
            and self.head_stats.keys() == other.head_stats.keys()
            and all(_same_array(v, other.head_stats[k]) for k, v in self.head_stats.items())
        )


@dataclass(eq=False)
class AttentionResult:
    """Attention of one model on one input. ``tokens``/``token_ids`` belong to the primary
    stack (the encoder's for encoder-decoder models); ``sentence_b_start`` is the index of
    the first token of ``pair`` in it (None without a pair, and for encoder-decoder models,
    whose pair is the decoder's input)."""

    model_name: str
    architecture: str  # decoder | encoder | encoder-decoder
    text: str
    pair: str | None
    tokens: list[str]
    token_ids: list[int]
    sentence_b_start: int | None
    stacks: dict[str, AttentionStack]
    n_layers: int
    n_heads: int

    @property
    def attentions(self) -> np.ndarray:
        """The primary stack's weights, (layers, heads, T, T)."""
        if self.architecture == "encoder-decoder" or len(self.stacks) != 1:
            raise NoPrimaryStackError(
                f"{self.model_name} is an encoder-decoder model with stacks "
                f"{', '.join(self.stacks)}: use .encoder, .decoder or .cross "
                "(each has .attentions)."
            )
        return next(iter(self.stacks.values())).attentions

    @property
    def encoder(self) -> AttentionStack | None:
        return self.stacks.get("encoder")

    @property
    def decoder(self) -> AttentionStack | None:
        return self.stacks.get("decoder")

    @property
    def cross(self) -> AttentionStack | None:
        return self.stacks.get("cross")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttentionResult):
            return NotImplemented
        names = [f for f in self.__dataclass_fields__ if f != "stacks"]
        same = all(getattr(self, n) == getattr(other, n) for n in names)
        return same and self.stacks == other.stacks

    def _repr_html_(self) -> str:
        try:
            from tzoo.web.standalone import render_result_html
        except ImportError:
            return _summary_html(self)
        return str(render_result_html(self))


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def _summary_html(result: AttentionResult) -> str:
    """A small table for Jupyter when the interactive renderer is not available."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{' &times; '.join(map(str, stack.attentions.shape))}"
        f"</td><td>{html.escape(' '.join(stack.query_tokens[:40]))}</td></tr>"
        for name, stack in result.stacks.items()
    )
    return (
        f"<p><b>{html.escape(result.model_name)}</b> ({html.escape(result.architecture)}): "
        f"attention on {len(result.tokens)} tokens</p><table><tr><th>stack</th>"
        f"<th>layers &times; heads &times; Tq &times; Tk</th><th>query tokens</th></tr>{rows}</table>"
    )


# -- the analysis ---------------------------------------------------------------------------


def attention(
    model: ModelHandle | str,
    text: str,
    pair: str | None = None,
    *,
    max_tokens: int | None = None,
    neurons: bool = True,
) -> AttentionResult:
    """Attention weights, query/key vectors and head statistics of ``model`` on ``text``.

    ``model``: a handle, or a catalogue name / local directory / hub id to load (the
    handle's lock is then held during the pass; a caller passing a handle holds the model
    itself, as ``tzoo.runtime.hooks.patch`` asks).

    ``pair`` depends on the architecture (an empty string means no pair):

    - encoder (BERT): a sentence pair, ``tokenizer(text, pair)`` with its token type ids;
      ``sentence_b_start`` is the first token of type 1.
    - decoder: ``pair`` is tokenized on its own without special tokens and appended to
      ``text``'s tokens (start it with a space if it continues the text);
      ``sentence_b_start`` is where it starts.
    - encoder-decoder (T5): the encoder reads ``text``; the decoder reads ``pair``
      teacher-forced, as T5 does in training: ``_shift_right(tokenizer(pair).input_ids)``,
      the decoder start token first. Without a pair, the decoder reads the shifted encoder
      input (the hooks' default), so both stacks have a position per input token.

    Inputs longer than ``max_tokens`` (default: the ``attention_max_tokens`` setting) or
    than the model's context raise InputTooLongError; they are never truncated. Empty text
    raises EmptyInputError. ``neurons=False`` skips the query/key vectors.
    """
    if not text or not text.strip():
        raise EmptyInputError("The text is empty; give the model something to read.")
    with _held(model) as handle:
        encoding = encode(handle, text, pair or None, _token_limit(handle, max_tokens))
        cache, slots = _forward(handle, encoding, neurons)
        stacks = _build_stacks(handle, encoding, cache, slots)
    primary = "decoder" if handle.architecture == "decoder" else "encoder"
    primary_ids = encoding.stack_ids.get(primary) or next(iter(encoding.stack_ids.values()))
    return AttentionResult(
        model_name=handle.name,
        architecture=handle.architecture,
        text=text,
        pair=pair or None,
        tokens=display_tokens(handle.tokenizer, primary_ids),
        token_ids=primary_ids,
        sentence_b_start=encoding.sentence_b_start,
        stacks=stacks,
        n_layers=handle.n_layers,
        n_heads=handle.n_heads,
    )


@contextmanager
def _held(model: ModelHandle | str) -> Iterator[ModelHandle]:
    if isinstance(model, ModelHandle):
        yield model
        return
    from tzoo.api import load_model

    handle = load_model(model)
    # Our hooks see every forward pass on the shared model: one analysis at a time.
    with handle.lock:
        yield handle


# -- tokenization ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """Model inputs for one sequence (batch of one) and the token ids of each stack."""

    inputs: dict[str, Tensor]  # input_ids (1, T), attention_mask, token_type_ids, ...
    stack_ids: dict[str, list[int]]  # "encoder" and/or "decoder" -> ids
    sentence_b_start: int | None


def encode(handle: ModelHandle, text: str, pair: str | None, limit: tuple[int, str]) -> Encoding:
    """Tokenize ``text`` (and ``pair``) as ``attention`` documents; refuse more tokens than
    ``limit`` = (tokens, name of the limit)."""
    if handle.architecture == "encoder-decoder":
        encoding = _encode_encoder_decoder(handle, text, pair)
    elif handle.architecture == "encoder":
        encoding = _encode_encoder(handle, text, pair)
    else:
        encoding = _encode_decoder(handle.tokenizer, text, pair)
    longest = max(len(ids) for ids in encoding.stack_ids.values())
    if longest == 0:
        raise EmptyInputError("The text gave no tokens; give the model something to read.")
    if longest > limit[0]:
        raise InputTooLongError(longest, *limit)
    return encoding


def _token_limit(handle: ModelHandle, max_tokens: int | None) -> tuple[int, str]:
    limit = max_tokens if max_tokens is not None else get_settings().attention_max_tokens
    config = handle.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if isinstance(context, int) and context < limit:
        return context, "the model's context length"
    return limit, LIMIT_SETTING


def _ids_tensor(ids: list[int]) -> Tensor:
    return torch.tensor([ids], dtype=torch.long)  # (1, T)


def _encode_decoder(tokenizer: Any, text: str, pair: str | None) -> Encoding:
    ids_a = list(tokenizer(text)["input_ids"])
    ids_b = list(tokenizer(pair, add_special_tokens=False)["input_ids"]) if pair else []
    ids = ids_a + ids_b
    inputs = {"input_ids": _ids_tensor(ids), "attention_mask": torch.ones_like(_ids_tensor(ids))}
    return Encoding(inputs, {"decoder": ids}, len(ids_a) if pair else None)


def _encode_encoder(handle: ModelHandle, text: str, pair: str | None) -> Encoding:
    # Ask for token type ids: not every tokenizer returns them unasked (the tiny ones).
    with_types = "token_type_ids" in inspect.signature(handle.model.forward).parameters
    encoded = handle.tokenizer(text, pair, return_token_type_ids=with_types)
    ids = list(encoded["input_ids"])
    inputs = {key: _ids_tensor(list(value)) for key, value in encoded.items()}
    types = list(encoded.get("token_type_ids") or [])
    start = types.index(1) if pair and 1 in types else None
    return Encoding(inputs, {"encoder": ids}, start)


def _encode_encoder_decoder(handle: ModelHandle, text: str, pair: str | None) -> Encoding:
    tokenizer = handle.tokenizer
    encoder_ids = list(tokenizer(text)["input_ids"])
    target = list(tokenizer(pair)["input_ids"]) if pair else encoder_ids
    decoder_ids = _shift_right(handle.model, target)
    inputs = {
        "input_ids": _ids_tensor(encoder_ids),
        "attention_mask": torch.ones(1, len(encoder_ids), dtype=torch.long),
        "decoder_input_ids": _ids_tensor(decoder_ids),
    }
    return Encoding(inputs, {"encoder": encoder_ids, "decoder": decoder_ids}, None)


def _shift_right(model: nn.Module, ids: list[int]) -> list[int]:
    """The decoder's teacher-forced input for target ``ids``: start token, then ids[:-1]."""
    shift = getattr(model, "_shift_right", None)
    if callable(shift):
        return [int(i) for i in shift(_ids_tensor(ids))[0]]
    config: Any = model.config
    return [int(config.decoder_start_token_id), *ids[:-1]]


def display_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Readable token strings, one per id. Byte-level BPE (GPT-2, SmolLM2) shows the text a
    token stands for (``"Ġcat"`` -> ``" cat"``, ``"Ã©"`` -> ``"é"``), SentencePiece's ``"▁"``
    becomes a space, a newline shows as ``"↵"``. WordPiece's ``"##"``, special tokens and
    byte pieces of an incomplete UTF-8 character stay as the tokenizer spells them."""
    raw = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    special = set(tokenizer.all_special_ids)
    readable = _byte_level_text if _is_byte_level(tokenizer) else _piece_text
    return [str(t) if i in special else readable(str(t)) for i, t in zip(ids, raw, strict=True)]


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return "ByteLevel" in repr(decoder)  # a ByteLevel decoder, alone or in a Sequence


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (``bytes_to_unicode``)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(extra)})
    return table


def _byte_level_text(token: str) -> str:
    table = _unicode_to_byte()
    if not all(ch in table for ch in token):
        return token
    try:
        text = bytes(table[ch] for ch in token).decode("utf-8")
    except UnicodeDecodeError:  # part of a multi-byte character: show it as it is
        return token.replace("Ġ", " ").replace("Ċ", "↵")
    return text.replace("\n", "↵")


def _piece_text(token: str) -> str:
    return "↵" if token == "<0x0A>" else token.replace("▁", " ")


# -- the forward pass and the query/key readers ---------------------------------------------


@dataclass
class HeadSlot:
    """What the hooks on one attention module saw (batch, heads, T, d_head) tensors."""

    query: Tensor | None = None
    key: Tensor | None = None  # key/value heads only, not yet repeated
    scale: float = 1.0
    position_bias: Tensor | None = None  # (1, heads, Tq, Tk), T5


NeuronReader = Callable[[Any, HeadSlot], list[RemovableHandle]]  # (attention module, slot)
Slots = dict[str, list[HeadSlot]]


def _forward(
    handle: ModelHandle, encoding: Encoding, neurons: bool
) -> tuple[ActivationCache, Slots | None]:
    with torch.no_grad(), _recording_neurons(handle, neurons) as slots:
        _, cache = run_with_cache(handle, encoding.inputs, sites=[])
    return cache, slots


@contextmanager
def _recording_neurons(handle: ModelHandle, enabled: bool) -> Iterator[Slots | None]:
    """Forward hooks on every attention module's projections for one pass; None when not
    wanted or when no reader knows the model type."""
    reader = NEURON_READERS.get(handle.family)
    if not enabled or reader is None:
        yield None
        return
    slots: Slots = {}
    installed: list[RemovableHandle] = []
    try:
        for stack, modules in attention_modules(handle).items():
            slots[stack] = [HeadSlot() for _ in modules]
            for module, slot in zip(modules, slots[stack], strict=True):
                installed += reader(module, slot)
        yield slots
    finally:
        for hook in installed:
            hook.remove()


def attention_modules(handle: ModelHandle) -> dict[str, list[nn.Module]]:
    """Per stack (and ``"cross"`` for T5), each layer's attention module."""
    adapter = adapter_for(handle)
    model = handle.model
    modules = {
        stack: [adapter.attention(block) for block in adapter.blocks(model, stack)]
        for stack in adapter.stack_names(model)
    }
    cross_path = CROSS_ATTENTION_PATHS.get(handle.family)
    if cross_path and "decoder" in modules:
        blocks = adapter.blocks(model, "decoder")
        modules["cross"] = [block.get_submodule(cross_path) for block in blocks]
    return modules


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)


def _scale_of(module: nn.Module, head_dim: int) -> float:
    scaling = getattr(module, "scaling", None)
    return float(scaling) if scaling is not None else head_dim**-0.5


def _on_output(module: nn.Module, store: Callable[[Tensor], None]) -> RemovableHandle:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        store(output.detach())

    return module.register_forward_hook(hook)


def _store_heads(slot: HeadSlot, which: str, head_dim: int) -> Callable[[Tensor], None]:
    def store(output: Tensor) -> None:
        setattr(slot, which, _split_heads(output, head_dim))

    return store


def _read_llama(module: Any, slot: HeadSlot) -> list[RemovableHandle]:
    """q_proj/k_proj outputs, then rotary with the (cos, sin) the module was given, through
    the very ``apply_rotary_pos_emb`` its forward calls."""
    head_dim = int(module.head_dim)
    slot.scale = _scale_of(module, head_dim)
    rotate = vars(inspect.getmodule(type(module)))["apply_rotary_pos_emb"]
    seen: dict[str, Any] = {}

    def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["rotary"] = kwargs.get("position_embeddings") or args[1]

    def after(_module: nn.Module, _args: Any, _output: Any) -> None:
        cos, sin = seen["rotary"]
        slot.query, slot.key = rotate(slot.query, slot.key, cos, sin)

    return [
        module.register_forward_pre_hook(before, with_kwargs=True),
        _on_output(module.q_proj, _store_heads(slot, "query", head_dim)),
        _on_output(module.k_proj, _store_heads(slot, "key", head_dim)),
        module.register_forward_hook(after),
    ]


def _read_gpt2(module: Any, slot: HeadSlot) -> list[RemovableHandle]:
    """GPT-2's fused ``c_attn`` output, split into query, key and value."""
    head_dim, width = int(module.head_dim), int(module.split_size)
    slot.scale = _scale_of(module, head_dim)

    def store(output: Tensor) -> None:
        query, key, _value = output.split(width, dim=2)
        slot.query, slot.key = _split_heads(query, head_dim), _split_heads(key, head_dim)

    return [_on_output(module.c_attn, store)]


def _read_bert(module: Any, slot: HeadSlot) -> list[RemovableHandle]:
    head_dim = int(module.attention_head_size)
    slot.scale = _scale_of(module, head_dim)
    return [
        _on_output(module.query, _store_heads(slot, "query", head_dim)),
        _on_output(module.key, _store_heads(slot, "key", head_dim)),
    ]


def _read_t5(module: Any, slot: HeadSlot) -> list[RemovableHandle]:
    """T5's ``q``/``k`` (keys from the encoder output in cross-attention) and the position
    bias the module returns as its second output."""
    head_dim = int(module.key_value_proj_dim)
    slot.scale = _scale_of(module, head_dim)  # 1.0: T5 folds the scale into its weights

    def bias(_module: nn.Module, _args: Any, output: Any) -> None:
        slot.position_bias = output[1].detach()

    return [
        _on_output(module.q, _store_heads(slot, "query", head_dim)),
        _on_output(module.k, _store_heads(slot, "key", head_dim)),
        module.register_forward_hook(bias),
    ]


# Query/key readers by ``config.model_type``; a type without one still gets attention
# weights and statistics, with ``queries``/``keys`` None.
NEURON_READERS: dict[str, NeuronReader] = {
    "llama": _read_llama,
    "gpt2": _read_gpt2,
    "bert": _read_bert,
    "t5": _read_t5,
}
# Where a decoder block keeps its cross-attention module, by ``config.model_type``.
CROSS_ATTENTION_PATHS: dict[str, str] = {"t5": "layer.1.EncDecAttention"}


# -- assembling the result ------------------------------------------------------------------


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


def _build_stacks(
    handle: ModelHandle, encoding: Encoding, cache: ActivationCache, slots: Slots | None
) -> dict[str, AttentionStack]:
    ids = encoding.stack_ids
    shown = {name: display_tokens(handle.tokenizer, stack_ids) for name, stack_ids in ids.items()}
    weights = {name: cache.attention(name) for name in cache.attentions}
    if cache.cross_attentions is not None:
        weights["cross"] = cache.cross_attention()
    stacks = {}
    for name, layers in weights.items():
        query_side, key_side = ("decoder", "encoder") if name == "cross" else (name, name)
        stacks[name] = _make_stack(
            name,
            (shown[query_side], shown[key_side]),
            _numpy(layers[:, 0]),  # (layers, heads, Tq, Tk)
            (slots or {}).get(name),
            ids[query_side] if name == "decoder" else None,
        )
    return stacks


def _make_stack(
    name: str,
    tokens: tuple[list[str], list[str]],
    attentions: np.ndarray,
    slots: list[HeadSlot] | None,
    induction_ids: list[int] | None,
) -> AttentionStack:
    queries, keys, scale, bias = _stack_neurons(slots, attentions.shape[1])
    return AttentionStack(
        name=name,
        query_tokens=tokens[0],
        key_tokens=tokens[1],
        attentions=attentions,
        queries=queries,
        keys=keys,
        score_scale=1.0 if scale is None else scale,
        head_stats=head_statistics(attentions, induction_ids, causal=name == "decoder"),
        position_bias=bias,
    )


def _stack_neurons(
    slots: list[HeadSlot] | None, n_heads: int
) -> tuple[np.ndarray | None, np.ndarray | None, float | None, np.ndarray | None]:
    """(layers, heads, Tq, D) queries, (layers, heads, Tk, D) keys, the score scale and the
    position bias. A layer whose scale differs from the first layer's (GPT-2's
    ``scale_attn_by_inverse_layer_idx``) has the ratio folded into its queries."""
    if not slots or any(s.query is None or s.key is None for s in slots):
        return None, None, None, None
    scale = slots[0].scale
    queries = np.stack([_numpy(_required(s.query)[0] * (s.scale / scale)) for s in slots])
    keys = np.stack([_numpy(_repeat_heads(_required(s.key), n_heads)[0]) for s in slots])
    bias = slots[0].position_bias  # T5: layer 0 computes it, later layers reuse it
    kept = _numpy(bias[0]) if bias is not None and bool(bias.any()) else None
    return queries, keys, scale, kept


def _required(x: Tensor | None) -> Tensor:
    assert x is not None
    return x


def _repeat_heads(keys: Tensor, n_heads: int) -> Tensor:
    """Grouped-query attention: query head h reads key/value head h // (heads / kv heads),
    as transformers' ``repeat_kv``."""
    return keys.repeat_interleave(n_heads // keys.shape[1], dim=1)  # (B, heads, T, D)


def attention_from_neurons(stack: AttentionStack) -> np.ndarray:
    """``softmax(score_scale * q @ k.T + position_bias + causal mask)``, (layers, heads, Tq,
    Tk): the attention weights rebuilt from the stack's query and key vectors."""
    if stack.queries is None or stack.keys is None:
        raise ValueError(f"The {stack.name} stack has no query/key vectors.")
    scores = stack.score_scale * np.einsum(
        "lhqd,lhkd->lhqk", stack.queries.astype(np.float64), stack.keys.astype(np.float64)
    )
    if stack.position_bias is not None:
        scores = scores + stack.position_bias
    if stack.causal:
        n_q, n_k = scores.shape[-2:]
        scores = np.where(np.tril(np.ones((n_q, n_k), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)).astype(np.float32)


# -- per-head statistics --------------------------------------------------------------------


def head_statistics(
    attn: np.ndarray, token_ids: Sequence[int] | None, causal: bool
) -> dict[str, np.ndarray]:
    """Per-head summaries of ``attn`` (layers, heads, Tq, Tk), each float32 (layers, heads):

    - ``entropy``: -sum_k p log p in nats, averaged over query positions.
    - ``mean_distance``: sum_k p |q - k|, averaged over queries (positions, not meaning,
      across the two sides of a cross-attention stack).
    - ``sink``: p(k = 0), averaged over queries q >= 1 (the first token as attention sink).
    - ``previous_token``: p(k = q - 1), averaged over queries q >= 1.
    - ``induction``: causal self-attention only (``causal`` and ``token_ids`` given): for a
      query whose token appeared before at positions j < q, the attention on the tokens
      that followed those occurrences (k = j + 1), averaged over such queries.
    NaN where a statistic has no query to average over or does not apply.
    """
    n_q, n_k = attn.shape[-2:]
    if token_ids is not None and len(token_ids) != n_q:
        raise ValueError(f"{len(token_ids)} token ids for {n_q} query positions.")
    distance = np.abs(np.arange(n_q)[:, None] - np.arange(n_k)[None, :]).astype(np.float64)
    targets = induction_targets(token_ids) if causal and token_ids is not None else None
    per_layer = [_layer_statistics(layer.astype(np.float64), distance, targets) for layer in attn]
    return {
        name: np.stack([stats[name] for stats in per_layer]).astype(np.float32)
        for name in STAT_NAMES
    }


def induction_targets(token_ids: Sequence[int]) -> np.ndarray:
    """(T, T) bool: [q, j + 1] is True when token j < q equals token q."""
    ids = np.asarray(token_ids)
    earlier_same = np.tril(ids[:, None] == ids[None, :], k=-1)  # [q, j]: j < q, same token
    targets = np.zeros_like(earlier_same)
    targets[:, 1:] = earlier_same[:, :-1]
    return targets


def _layer_statistics(
    p: np.ndarray, distance: np.ndarray, targets: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Statistics of one layer's weights ``p`` (heads, Tq, Tk), each (heads,)."""
    n_heads, n_q, n_k = p.shape
    nan = np.full(n_heads, np.nan)
    log_p = np.log(np.where(p > 0, p, 1.0))
    previous = np.arange(1, min(n_q, n_k + 1))  # queries q >= 1 with a key q - 1
    stats = {
        "entropy": -(p * log_p).sum(-1).mean(-1),
        "mean_distance": (p * distance).sum(-1).mean(-1),
        "sink": p[:, 1:, 0].mean(-1) if n_q > 1 else nan,
        "previous_token": p[:, previous, previous - 1].mean(-1) if previous.size else nan,
        "induction": nan,
    }
    if targets is not None and targets.any():
        rows = targets.any(-1)
        stats["induction"] = (p[:, rows] * targets[rows]).sum(-1).mean(-1)
    return stats
