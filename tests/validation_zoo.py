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
    (mask 0) are never attended to."""

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
        x = self.embed(input_ids) + self.positions(torch.arange(t, device=input_ids.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).triu(1)
        padding = None if attention_mask is None else attention_mask == 0
        h = self.blocks(x, mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.norm(h) @ self.embed.weight.T


def tiny_causal_lm(seed: int = 0, **kwargs: int) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(**kwargs).eval()
