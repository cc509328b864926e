"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", §2).

The real model runs once on the prompt; from that run we keep what the replacement model
holds fixed:

- every attention pattern (the softmax outputs, per layer and head),
- every normalisation denominator (RMSNorm's ``1/sqrt(mean(x^2) + eps)``, LayerNorm's
  ``1/sqrt(var(x) + eps)``, per position),
- every MLP output, split into what the transcoders explain and a constant error term:
  ``mlp_out = sum of active features' decoder vectors + b_dec (+ W_skip x) + error``.

With those fixed, the map from the sources (token embeddings, feature activations, error
terms) to every feature pre-activation and every logit is affine: the residual stream only
passes through frozen norms (a per-position scale), the value and output projections of
attention mixed by fixed patterns, and the linear skip path of a skip transcoder. The
replacement model reproduces the real model's logits exactly on this prompt (the error terms
make up the difference), so an attribution graph built from it is a faithful decomposition.

This module rebuilds that linear path from the model's own weights (a small adapter per
family: llama, gpt2 and bert) instead of patching the real forward pass: attention in the
local model needs no queries or keys, so a pass over it is a few matrix products per layer,
and the graph autograd keeps for attribution holds no softmax. Layers the transcoders do not
cover keep their whole MLP output as the error term.

Encoders (BERT with its masked-LM head) fit the same frame with three differences: the
norms come after each residual add (post-norm) and after the embeddings, the transcoders
read the attention sublayer's normed output (what BERT's MLP reads), and the head puts a
dense layer and a GELU between the last block and the logits. The GELU is frozen like the
norms: ``gelu(t) = t * g`` with the gate ``g = gelu(t) / t`` taken from the clean run, per
position and channel, so the head is linear too and still reproduces the logits. An
encoder predicts masked tokens, not a next token, so its default target is the first mask
token of the prompt. Encoder-decoders (T5) are refused: their decoder reads the encoder
through cross-attention, a second stream this model does not trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tzoo.analyses.attention import EmptyInputError, InputTooLongError
from tzoo.circuits.transcoders import (
    HUB_IDS,
    FoldedLayer,
    TranscoderMismatchError,
    TranscoderSet,
    topk_activation,
)
from tzoo.runtime.errors import UnsupportedArchitectureError
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import run_with_cache

NormKind = Literal["rms", "layer"]
MlpFn = Callable[[int, Tensor], Tensor]  # (layer, mlp input (..., T, d)) -> mlp output


class ReplacementUnsupportedError(UnsupportedArchitectureError):
    """The model has no local replacement model here (an encoder, or an unknown family)."""


class TargetPositionError(ValueError):
    """A target position outside the prompt."""


# -- the linear pieces of a model -------------------------------------------------------------


@dataclass(frozen=True)
class FrozenNorm:
    """A normalisation whose denominator comes from the clean run: ``rms``: ``w * x * s``;
    ``layer``: ``w * (x - mean(x)) * s + b``, with ``s`` (T, 1) fixed."""

    kind: NormKind
    weight: Tensor  # (d,)
    bias: Tensor | None  # (d,)
    eps: float

    def scale(self, x: Tensor) -> Tensor:
        """(..., T, 1) the denominator ``s`` the norm uses on ``x`` (..., T, d)."""
        x = x.float()
        if self.kind == "rms":
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)

    def __call__(self, x: Tensor, scale: Tensor) -> Tensor:
        if self.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        out = x * scale * self.weight
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class AttentionMaps:
    """The linear path through one self-attention layer once its pattern is fixed:
    ``out = concat_h(P_h @ (x W_V + b_V)_{kv(h)}) W_O + b_O``."""

    w_value: Tensor  # (d, n_kv_heads * head_dim), applied as x @ w_value
    b_value: Tensor | None
    w_out: Tensor  # (n_heads * head_dim, d)
    b_out: Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __call__(self, x: Tensor, pattern: Tensor) -> Tensor:
        """``x`` (..., T, d), ``pattern`` (n_heads, T, T) -> (..., T, d)."""
        *lead, t, _ = x.shape
        v = x @ self.w_value
        if self.b_value is not None:
            v = v + self.b_value
        v = v.view(*lead, t, self.n_kv_heads, self.head_dim).transpose(-2, -3)  # (..., kv, T, dh)
        # Query heads sharing a key/value head (grouped-query attention) are stacked along
        # the query axis, so one matmul per kv head serves them all.
        group = self.n_heads // self.n_kv_heads
        mixed = pattern.reshape(self.n_kv_heads, group * t, t) @ v  # (..., kv, group*T, dh)
        z = mixed.reshape(*lead, self.n_heads, t, self.head_dim).transpose(-2, -3)
        out = z.reshape(*lead, t, self.n_heads * self.head_dim) @ self.w_out
        return out if self.b_out is None else out + self.b_out


@dataclass(frozen=True)
class HeadTransform:
    """A masked-LM head's transform before its norm, ``act(x @ weight + bias)``; in the
    replacement model ``act`` is frozen as a gate (see the module docstring)."""

    weight: Tensor  # (d, d), applied as x @ weight
    bias: Tensor | None
    activation: Callable[[Tensor], Tensor]

    def pre(self, x: Tensor) -> Tensor:
        out = x @ self.weight
        return out if self.bias is None else out + self.bias

    def gate(self, pre: Tensor) -> Tensor:
        """``act(pre) / pre`` elementwise (0 where ``pre`` is 0, as ``act(0) = 0``)."""
        safe = torch.where(pre == 0, torch.ones_like(pre), pre)
        return torch.where(pre == 0, torch.zeros_like(pre), self.activation(pre) / safe)


@dataclass(frozen=True)
class LinearParts:
    """Everything of a model that stays in the local replacement model.

    Pre-norm (llama, gpt2): ``attn_norms`` and ``mlp_norms`` normalise what attention and
    the MLP read. Post-norm (``post_norm``, bert): ``attn_norms`` normalise the residual
    after attention's add (which the MLP then reads), ``mlp_norms`` after the MLP's add.
    """

    embedding: Tensor  # (V, d) token embeddings
    # (positions, d) what is added to the token embeddings: learned absolute positions
    # (GPT-2; BERT's plus its first token-type row)
    position_embedding: Tensor | None
    attn_norms: list[FrozenNorm]
    attention: list[AttentionMaps]
    mlp_norms: list[FrozenNorm]
    final_norm: FrozenNorm
    unembedding: Tensor  # (V, d)
    unembedding_bias: Tensor | None  # (V,)
    post_norm: bool = False
    embedding_norm: FrozenNorm | None = None  # BERT's LayerNorm of the embeddings
    head: HeadTransform | None = None  # before ``final_norm``: a masked-LM head's transform


def _frozen_norm(module: nn.Module) -> FrozenNorm:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm) and isinstance(weight, Tensor):
        bias = module.bias.detach().float() if module.bias is not None else None
        return FrozenNorm("layer", weight.detach().float(), bias, float(module.eps))
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if type(module).__name__.endswith("RMSNorm") and isinstance(weight, Tensor) and eps:
        return FrozenNorm("rms", weight.detach().float(), None, float(eps))
    raise ReplacementUnsupportedError(
        f"Cannot freeze a {type(module).__name__}: only LayerNorm and RMSNorm are supported."
    )


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float()


def _llama_parts(model: Any) -> LinearParts:
    base, config = model.model, model.config
    attention = []
    for block in base.layers:
        attn = block.self_attn
        attention.append(
            AttentionMaps(
                w_value=attn.v_proj.weight.detach().float().T,
                b_value=_float(attn.v_proj.bias),
                w_out=attn.o_proj.weight.detach().float().T,
                b_out=_float(attn.o_proj.bias),
                n_heads=int(config.num_attention_heads),
                n_kv_heads=int(config.num_key_value_heads),
                head_dim=int(attn.head_dim),
            )
        )
    return LinearParts(
        embedding=base.embed_tokens.weight.detach().float(),
        position_embedding=None,
        attn_norms=[_frozen_norm(b.input_layernorm) for b in base.layers],
        attention=attention,
        mlp_norms=[_frozen_norm(b.post_attention_layernorm) for b in base.layers],
        final_norm=_frozen_norm(base.norm),
        unembedding=model.lm_head.weight.detach().float(),
        unembedding_bias=_float(getattr(model.lm_head, "bias", None)),
    )


def _gpt2_parts(model: Any) -> LinearParts:
    base, config = model.transformer, model.config
    d = int(config.n_embd)
    attention = []
    for block in base.h:
        c_attn, c_proj = block.attn.c_attn, block.attn.c_proj  # Conv1D: x @ weight + bias
        attention.append(
            AttentionMaps(
                w_value=c_attn.weight.detach().float()[:, 2 * d : 3 * d],
                b_value=c_attn.bias.detach().float()[2 * d : 3 * d],
                w_out=c_proj.weight.detach().float(),
                b_out=_float(c_proj.bias),
                n_heads=int(config.n_head),
                n_kv_heads=int(config.n_head),
                head_dim=d // int(config.n_head),
            )
        )
    return LinearParts(
        embedding=base.wte.weight.detach().float(),
        position_embedding=base.wpe.weight.detach().float(),
        attn_norms=[_frozen_norm(b.ln_1) for b in base.h],
        attention=attention,
        mlp_norms=[_frozen_norm(b.ln_2) for b in base.h],
        final_norm=_frozen_norm(base.ln_f),
        unembedding=model.lm_head.weight.detach().float(),
        unembedding_bias=_float(getattr(model.lm_head, "bias", None)),
    )


_FAMILIES: dict[str, Callable[[Any], LinearParts]] = {}


def register_replacement_family(model_type: str, parts: Callable[[Any], LinearParts]) -> None:
    """Let models whose ``config.model_type`` is ``model_type`` have replacement models:
    ``parts(model)`` reads their linear pieces (see ``LinearParts``)."""
    _FAMILIES[model_type] = parts


def _bert_parts(model: Any) -> LinearParts:
    base, config = model.bert, model.config
    embeddings = base.embeddings
    n_heads = int(config.num_attention_heads)
    attention = []
    for block in base.encoder.layer:
        attn = block.attention
        attention.append(
            AttentionMaps(
                w_value=attn.self.value.weight.detach().float().T,
                b_value=_float(attn.self.value.bias),
                w_out=attn.output.dense.weight.detach().float().T,
                b_out=_float(attn.output.dense.bias),
                n_heads=n_heads,
                n_kv_heads=n_heads,
                head_dim=int(config.hidden_size) // n_heads,
            )
        )
    head = model.cls.predictions
    transform = head.transform
    return LinearParts(
        embedding=embeddings.word_embeddings.weight.detach().float(),
        # A single-segment prompt: every position has token type 0.
        position_embedding=(
            embeddings.position_embeddings.weight + embeddings.token_type_embeddings.weight[0]
        )
        .detach()
        .float(),
        attn_norms=[_frozen_norm(b.attention.output.LayerNorm) for b in base.encoder.layer],
        attention=attention,
        mlp_norms=[_frozen_norm(b.output.LayerNorm) for b in base.encoder.layer],
        final_norm=_frozen_norm(transform.LayerNorm),
        unembedding=head.decoder.weight.detach().float(),
        unembedding_bias=_float(head.decoder.bias),
        post_norm=True,
        embedding_norm=_frozen_norm(embeddings.LayerNorm),
        head=HeadTransform(
            weight=transform.dense.weight.detach().float().T,
            bias=_float(transform.dense.bias),
            activation=transform.transform_act_fn,
        ),
    )


register_replacement_family("llama", _llama_parts)
register_replacement_family("gpt2", _gpt2_parts)
register_replacement_family("bert", _bert_parts)


def stack_of(handle: ModelHandle) -> str:
    """The hook-point stack a replacement model of ``handle`` traces."""
    return "decoder" if handle.architecture == "decoder" else "encoder"


def linear_parts(handle: ModelHandle) -> LinearParts:
    """The linear pieces of ``handle``'s model, or ReplacementUnsupportedError."""
    if handle.architecture not in ("decoder", "encoder"):
        raise ReplacementUnsupportedError(
            f"Attribution graphs need a decoder-only language model or an encoder with a "
            f"masked-LM head; {handle.name!r} is an {handle.architecture} ({handle.family}), "
            "whose decoder reads the encoder through cross-attention, a second stream the "
            "replacement model does not trace."
        )
    build = _FAMILIES.get(handle.family)
    if build is None:
        raise ReplacementUnsupportedError(
            f"No replacement model for model type {handle.family!r}; supported: "
            f"{', '.join(sorted(_FAMILIES))}. Add one with register_replacement_family()."
        )
    head = getattr(handle.model, "get_output_embeddings", lambda: None)()
    if head is None:
        what = (
            "an encoder without a masked-LM head (a sentence-embedding model such as "
            "minilm-l6 has none)"
            if handle.architecture == "encoder"
            else "loaded without its language-model head"
        )
        raise ReplacementUnsupportedError(
            f"{handle.name!r} is {what}: an attribution graph explains logits, so it needs a "
            "checkpoint with its head (for encoders a masked-LM such as tiny-bert-mlm or a "
            "local bert-base-uncased directory)."
        )
    return build(handle.model)


def _moved(folded: FoldedLayer, device: torch.device) -> FoldedLayer:
    """``folded`` as float32 on ``device``."""

    def move(t: Tensor) -> Tensor:
        return t.to(device, torch.float32)

    return FoldedLayer(
        W_enc=move(folded.W_enc),
        b_enc=move(folded.b_enc),
        threshold=move(folded.threshold),
        W_dec=move(folded.W_dec),
        b_dec=move(folded.b_dec),
        W_skip=None if folded.W_skip is None else move(folded.W_skip),
    )


# -- checks -----------------------------------------------------------------------------------


def check_transcoders(handle: ModelHandle, transcoders: TranscoderSet) -> None:
    """TranscoderMismatchError unless ``transcoders`` were made for ``handle``'s model."""
    config = transcoders.config
    problems = []
    # Sets in circuit-tracer's own files name the hub id of a bundled model.
    if config.model_name and config.model_name not in {handle.name, HUB_IDS.get(handle.name)}:
        problems.append(f"they were trained on {config.model_name!r}")
    if config.d_model != handle.d_model:
        problems.append(f"their width is {config.d_model}, the model's is {handle.d_model}")
    if config.n_model_layers != handle.n_layers:
        problems.append(
            f"they expect {config.n_model_layers} layers, the model has {handle.n_layers}"
        )
    stack = stack_of(handle)
    sites = (config.stack, config.input_site, config.output_site)
    if sites != (stack, "mlp_in", "mlp_out"):
        problems.append(
            f"they read {config.hook_in(0)!r} and write {config.hook_out(0)!r}, not the "
            f"{stack}'s MLP input and output"
        )
    if problems:
        raise TranscoderMismatchError(
            f"These transcoders do not fit model {handle.name!r}: {'; '.join(problems)}."
        )


def tokenize(handle: ModelHandle, prompt: str | Sequence[int]) -> Tensor:
    """(T,) token ids of ``prompt`` (text, with the tokenizer's special tokens, or ids)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise EmptyInputError("The prompt is empty; give the model something to read.")
        ids = torch.tensor(handle.tokenizer(prompt)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(list(prompt), dtype=torch.long)
    if ids.numel() == 0:
        raise EmptyInputError("The prompt gave no tokens; give the model something to read.")
    if ids.min() < 0 or ids.max() >= handle.vocab_size:
        raise ValueError(f"Token ids must lie in 0..{handle.vocab_size - 1}.")
    context = getattr(handle.config, "max_position_embeddings", None) or getattr(
        handle.config, "n_positions", None
    )
    if isinstance(context, int) and ids.numel() > context:
        raise InputTooLongError(ids.numel(), context, "the model's context length")
    return ids


def default_target_position(handle: ModelHandle, input_ids: Tensor) -> int:
    """Where logits are read when no position is given: a decoder's last token (the next
    token); an encoder's first mask token (what a masked-LM predicts)."""
    if handle.architecture == "decoder":
        return int(input_ids.numel()) - 1
    mask_id = getattr(handle.tokenizer, "mask_token_id", None)
    hits = [] if mask_id is None else (input_ids == mask_id).nonzero().flatten().tolist()
    if not hits:
        mask = getattr(handle.tokenizer, "mask_token", None) or "a mask token"
        raise TargetPositionError(
            f"{handle.name!r} is an encoder: it predicts masked tokens, not a next token. Put "
            f"{mask} in the prompt where the prediction is wanted, or give the target position."
        )
    return int(hits[0])


def resolve_position(position: int, n_tokens: int) -> int:
    """``position`` as an index 0..T-1 (negative ones count from the end)."""
    if not -n_tokens <= position < n_tokens:
        raise TargetPositionError(
            f"Target position {position} is outside the prompt's {n_tokens} tokens "
            f"(use 0..{n_tokens - 1}, or -1 for the last)."
        )
    return position % n_tokens


# -- the replacement model --------------------------------------------------------------------


@dataclass(frozen=True)
class ReplacementPass:
    """One pass of the local replacement model: what each layer's MLP (and so each
    transcoder) read, and the final normed residual the unembedding reads."""

    mlp_inputs: list[Tensor]  # n_layers x (..., T, d)
    final: Tensor  # (..., T, d)


@dataclass(eq=False)
class ReplacementModel:
    """The local replacement model of one prompt; see the module docstring.

    Everything is float32 on the model's device. Layer lists run over every model layer;
    ``folded``, ``pre_activations`` and ``activations`` only over the transcoders' layers.
    """

    handle: ModelHandle
    transcoders: TranscoderSet
    input_ids: Tensor  # (T,)
    token_strings: list[str]
    parts: LinearParts
    patterns: list[Tensor]  # n_layers x (n_heads, T, T)
    attn_scales: list[Tensor]  # n_layers x (T, 1)
    mlp_scales: list[Tensor]  # n_layers x (T, 1)
    final_scale: Tensor  # (T, 1)
    mlp_in: Tensor  # (n_layers, T, d) the real model's MLP inputs
    mlp_out: Tensor  # (n_layers, T, d) the real model's MLP outputs
    logits: Tensor  # (T, V) the real model's logits
    folded: dict[int, FoldedLayer]
    pre_activations: dict[int, Tensor]  # layer -> (T, F)
    activations: dict[int, Tensor]  # layer -> (T, F)
    errors: Tensor  # (n_layers, T, d) real MLP output minus the transcoders' prediction
    embedding_scale: Tensor | None = None  # (T, 1) the embedding norm's (BERT)
    head_gate: Tensor | None = None  # (T, d) the head's frozen activation (BERT)

    @property
    def model_name(self) -> str:
        return self.handle.name

    @property
    def n_layers(self) -> int:
        return len(self.patterns)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def layers(self) -> tuple[int, ...]:
        """The model layers the transcoders replace."""
        return self.transcoders.layers

    @property
    def embeddings(self) -> Tensor:
        """(T, d) the prompt's token embeddings: the token nodes' vectors."""
        return self.parts.embedding[self.input_ids]

    @property
    def position_bias(self) -> Tensor:
        """(T, d) what the model adds to the token embeddings (GPT-2's positions), or 0."""
        table = self.parts.position_embedding
        if table is None:
            return torch.zeros_like(self.embeddings)
        return table[: self.n_tokens]

    # -- the MLP replacements -----------------------------------------------------------
    def skip(self, layer: int, x: Tensor) -> Tensor | None:
        """The skip transcoder's linear path ``x @ W_skip`` of ``layer``, or None."""
        folded = self.folded.get(layer)
        if folded is None or folded.W_skip is None:
            return None
        return x @ folded.W_skip

    def decoder_vectors(self, layer: int, features: Tensor) -> Tensor:
        """Decoder rows of ``features`` (n,) of ``layer``: (n, d) for per-layer transcoders,
        (n, n_later, d) for a cross-layer transcoder (one per layer it writes to)."""
        return self.folded[layer].W_dec[features]

    def decode(self, layer: int, activations: dict[int, Tensor]) -> Tensor:
        """(..., T, d) what the features of ``activations`` (by layer, (..., T, F) each) write
        to ``layer``'s MLP output, ``b_dec`` included; a cross-layer transcoder reads every
        earlier layer's activations."""
        folded = self.folded[layer]
        if self.transcoders.config.kind != "clt":
            return activations[layer] @ folded.W_dec + folded.b_dec
        index = self.layers.index(layer)
        out = folded.b_dec
        for source_index, source in enumerate(self.layers[: index + 1]):
            out = out + activations[source] @ self.folded[source].W_dec[:, index - source_index]
        return out

    def feature_outputs(self, activations: dict[int, Tensor]) -> Tensor:
        """(n_layers, T, d) what the features write to each MLP output, ``b_dec`` included
        (zero at layers without a transcoder)."""
        out = torch.zeros_like(self.mlp_out)
        layers = self.layers
        for index, layer in enumerate(layers):
            folded = self.folded[layer]
            acts = activations[layer]
            if self.transcoders.config.kind == "clt":
                # (T, F) @ (F, n_later * d): every later layer's share at once.
                written = acts @ folded.W_dec.flatten(1)
                written = written.view(self.n_tokens, len(layers) - index, -1)
                for offset, target in enumerate(layers[index:]):
                    out[target] += written[:, offset]
            else:
                out[layer] += acts @ folded.W_dec
            out[layer] += folded.b_dec
        return out

    def constants(
        self, activations: dict[int, Tensor] | None = None, errors: Tensor | None = None
    ) -> list[Tensor]:
        """Each layer's MLP output minus its skip path, as the replacement holds it fixed:
        features' decoder vectors + ``b_dec`` + error. Defaults: the clean run (then these
        add up to the real MLP outputs)."""
        acts = self.activations if activations is None else activations
        errs = self.errors if errors is None else errors
        total = self.feature_outputs(acts) + errs
        return [total[layer] for layer in range(self.n_layers)]

    # -- passes -------------------------------------------------------------------------
    def run(self, embeddings: Tensor, mlp: MlpFn) -> ReplacementPass:
        """A pass with frozen patterns, norms (and head gate); ``mlp(layer, x)`` gives each
        layer's MLP output from its input ``x`` (..., T, d). ``embeddings`` (..., T, d) are
        the token embeddings (positions are added here)."""
        parts = self.parts
        residual = embeddings + self.position_bias
        if parts.embedding_norm is not None and self.embedding_scale is not None:
            residual = parts.embedding_norm(residual, self.embedding_scale)
        inputs = []
        for layer in range(self.n_layers):
            attention, pattern = parts.attention[layer], self.patterns[layer]
            if parts.post_norm:
                m = parts.attn_norms[layer](
                    residual + attention(residual, pattern), self.attn_scales[layer]
                )
                inputs.append(m)
                residual = parts.mlp_norms[layer](m + mlp(layer, m), self.mlp_scales[layer])
                continue
            x = parts.attn_norms[layer](residual, self.attn_scales[layer])
            residual = residual + attention(x, pattern)
            m = parts.mlp_norms[layer](residual, self.mlp_scales[layer])
            inputs.append(m)
            residual = residual + mlp(layer, m)
        if parts.head is not None and self.head_gate is not None:
            residual = parts.head.pre(residual) * self.head_gate
        final = parts.final_norm(residual, self.final_scale)
        return ReplacementPass(mlp_inputs=inputs, final=final)

    def forward(
        self, embeddings: Tensor | None = None, constants: Sequence[Tensor] | None = None
    ) -> ReplacementPass:
        """The linear local replacement model: each MLP output is ``constants[layer]`` plus
        the skip path of its input. Defaults: the clean run's embeddings and constants."""
        consts = self.constants() if constants is None else constants

        def mlp(layer: int, x: Tensor) -> Tensor:
            skip = self.skip(layer, x)
            return consts[layer] if skip is None else consts[layer] + skip

        return self.run(self.embeddings if embeddings is None else embeddings, mlp)

    def unembed(self, final: Tensor) -> Tensor:
        """(..., T, V) logits from the final normed residual."""
        logits = final @ self.parts.unembedding.T
        bias = self.parts.unembedding_bias
        return logits if bias is None else logits + bias

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """(..., T, F) pre-activations of ``layer``'s features for MLP inputs ``x``."""
        folded = self.folded[layer]
        return x @ folded.W_enc + folded.b_enc

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        """(..., T, F) activations from pre-activations (the transcoders' JumpReLU or TopK)."""
        config = self.transcoders.config
        if config.activation == "topk":
            return topk_activation(pre, config.top_k)
        return pre * (pre > self.folded[layer].threshold)


@torch.no_grad()
def build_replacement(
    handle: ModelHandle, transcoders: TranscoderSet, prompt: str | Sequence[int]
) -> ReplacementModel:
    """Run ``handle``'s model on ``prompt`` once and freeze what the local replacement
    model keeps fixed (see the module docstring)."""
    parts = linear_parts(handle)
    check_transcoders(handle, transcoders)
    ids = tokenize(handle, prompt)
    device = torch.device(handle.device)
    stack = stack_of(handle)
    with handle.lock:
        outputs, cache = run_with_cache(
            handle,
            {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]},
            sites=["resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post"],
            stacks=stack,
        )
    n_layers = handle.n_layers

    def site(name: str) -> Tensor:  # (n_layers, T, d)
        return torch.stack([cache[f"{stack}.{i}.{name}"][0].float() for i in range(n_layers)])

    resid_pre, attn_out = site("resid_pre"), site("attn_out")
    mlp_in, mlp_out = site("mlp_in"), site("mlp_out")
    last = cache[f"{stack}.{n_layers - 1}.resid_post"][0].float()
    patterns = cache.attention(stack)[:, 0].float()  # (n_layers, heads, T, T)
    if parts.post_norm:  # each norm reads the residual after its sublayer's add
        attn_scales = [
            parts.attn_norms[i].scale(resid_pre[i] + attn_out[i]) for i in range(n_layers)
        ]
        mlp_scales = [parts.mlp_norms[i].scale(mlp_in[i] + mlp_out[i]) for i in range(n_layers)]
    else:
        attn_scales = [parts.attn_norms[i].scale(resid_pre[i]) for i in range(n_layers)]
        mlp_scales = [parts.mlp_norms[i].scale(resid_pre[i] + attn_out[i]) for i in range(n_layers)]
    embedding_scale = head_gate = None
    if parts.embedding_norm is not None:
        table = parts.position_embedding
        raw = parts.embedding[ids.to(parts.embedding.device)]
        if table is not None:
            raw = raw + table[: ids.numel()]
        embedding_scale = parts.embedding_norm.scale(raw)
    if parts.head is not None:
        pre = parts.head.pre(last)
        head_gate = parts.head.gate(pre)
        last = pre * head_gate

    folded = {layer: _moved(transcoders.folded(layer), device) for layer in transcoders.layers}
    replacement = ReplacementModel(
        handle=handle,
        transcoders=transcoders,
        input_ids=ids.to(device),
        token_strings=[handle.tokenizer.decode([int(i)]) for i in ids],
        parts=parts,
        patterns=list(patterns),
        attn_scales=attn_scales,
        mlp_scales=mlp_scales,
        final_scale=parts.final_norm.scale(last),
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        logits=outputs.logits[0].float(),
        folded=folded,
        pre_activations={},
        activations={},
        errors=mlp_out,  # replaced just below, once the predictions can be made
        embedding_scale=embedding_scale,
        head_gate=head_gate,
    )
    for layer in folded:
        pre = replacement.encode(layer, mlp_in[layer])
        replacement.pre_activations[layer] = pre
        replacement.activations[layer] = replacement.activate(layer, pre)
    prediction = replacement.feature_outputs(replacement.activations)
    for layer in folded:
        skip = replacement.skip(layer, mlp_in[layer])
        if skip is not None:
            prediction[layer] += skip
    replacement.errors = mlp_out - prediction
    return replacement
