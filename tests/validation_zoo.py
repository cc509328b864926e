"""Models for the validation tests: well-formed ones that must pass every check that
applies to them, and (added by the tier tests) broken ones that one check must catch."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

VOCAB = 97
D_MODEL = 32
MAX_LEN = 64


class TinyCausalLM(nn.Module):
    """A plain ``nn.TransformerEncoder`` language model: token and learned position
    embeddings, pre-norm layers under a causal mask, a final norm and a tied unembedding.
    ``forward(input_ids, attention_mask=None) -> (B, T, V)`` logits; padding positions
    (mask 0) are never attended to by real positions, and positions count real tokens only
    (so left padding works too).

    The bug zoo below changes one small piece each: ``future`` (the mask), ``embed_input``,
    ``unembed`` or the initialisation."""

    future = 0  # how many future tokens the causal mask lets through (a bug when > 0)

    def __init__(
        self,
        vocab_size: int = VOCAB,
        d_model: int = D_MODEL,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = MAX_LEN,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d_model))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        t = input_ids.shape[1]
        x = self.embed_input(input_ids, attention_mask)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).triu(1 + self.future)
        if attention_mask is None:
            h = self.blocks(x, mask=causal, is_causal=self.future == 0)
        else:
            h = self.blocks(x, mask=self.blocked(causal, attention_mask))
        return self.unembed(h)

    def embed_input(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            at = torch.arange(input_ids.shape[1], device=input_ids.device)
        else:
            at = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.embed(input_ids) + self.positions(at)

    def unembed(self, h: Tensor) -> Tensor:
        return self.norm(h) @ self.embed.weight.T

    def blocked(self, causal: Tensor, attention_mask: Tensor) -> Tensor:
        """(B * heads, T, T): True where a query may not look (the future, and padding).
        A pad may still look at itself: a row with every key masked would give NaN, which
        then spreads to the real positions through 0 * NaN in the next layer."""
        t = causal.shape[0]
        blocked = causal | (attention_mask == 0)[:, None, :]
        blocked = blocked & ~torch.eye(t, dtype=torch.bool, device=causal.device)
        heads = self.blocks.layers[0].self_attn.num_heads
        return blocked.repeat_interleave(heads, dim=0)


def tiny_causal_lm(seed: int = 0, **kwargs: int) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(**kwargs).eval()


# -- the bug zoo: each model has one bug that one tier-1 check must catch -----------------------


class LeakyMaskLM(TinyCausalLM):
    """Causal mask off by one: each position also sees the next token (causality)."""

    future = 1


class DetachedBranchLM(TinyCausalLM):
    """An adapter whose output is detached: its parameters never get a gradient
    (gradient_flow)."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.adapter = nn.Linear(D_MODEL, D_MODEL)

    def embed_input(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        x = super().embed_input(input_ids, attention_mask)
        return x + self.adapter(x).detach()


class UnusedLayerLM(TinyCausalLM):
    """A layer built and never called: its parameters never get a gradient
    (gradient_flow)."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.unused = nn.Linear(D_MODEL, D_MODEL)


class BatchMixingLM(TinyCausalLM):
    """Embeddings centred over the batch dimension: a row's logits depend on the other rows
    (batch_equivalence)."""

    def embed_input(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        x = super().embed_input(input_ids, attention_mask)
        return x - x.mean(dim=0, keepdim=True)


class HalfOverflowLM(TinyCausalLM):
    """Scales the residual stream up by 1e5 and back: exact in fp32 and bf16, but past
    fp16's 65504 it is inf, and the final norm makes it NaN (half_precision)."""

    def unembed(self, h: Tensor) -> Tensor:
        return super().unembed((h * 1e5) / 1e5)


class ZeroWeightLM(TinyCausalLM):
    """The first feed-forward matrix initialised to zeros (initialisation)."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        nn.init.zeros_(self.blocks.layers[0].linear1.weight)


class HugeInitLM(TinyCausalLM):
    """The second feed-forward matrix drawn with std 100 (initialisation)."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        nn.init.normal_(self.blocks.layers[1].linear2.weight, std=100.0)


class IgnoresMaskLM(TinyCausalLM):
    """Takes an attention mask and ignores it: pads are attended to (padding_invariance)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return super().forward(input_ids)


# model class -> the one tier-1 check that must fail on it
BUG_ZOO: dict[type[TinyCausalLM], str] = {
    LeakyMaskLM: "causality",
    DetachedBranchLM: "gradient_flow",
    UnusedLayerLM: "gradient_flow",
    BatchMixingLM: "batch_equivalence",
    HalfOverflowLM: "half_precision",
    ZeroWeightLM: "initialisation",
    IgnoresMaskLM: "padding_invariance",
}


def build(cls: type[TinyCausalLM], seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return cls().eval()
