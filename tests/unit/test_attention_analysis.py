"""The attention analysis on the tiny models, against direct transformers computations."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses import (
    AttentionResult,
    AttentionStack,
    EmptyInputError,
    InputTooLongError,
    attention,
    display_tokens,
    head_statistics,
)
from tzoo.analyses.attention import attention_from_neurons, induction_targets
from tzoo.analyses.attention_record import (
    attention_meta,
    attention_parts,
    result_from_record,
)
from tzoo.config import get_settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

TINY = ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"]
CAUSAL = ["tiny-gpt2", "tiny-llama"]
TEXT = "The cat sat on the mat. The cat"
PAIR = " It was happy."
EXACT = 1e-6  # our weights against transformers' own: the same computation
GOLDEN = 1e-4  # softmax(q·k) rebuilt in float64 against the model's float32 weights


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("attention")))


def direct(handle: ModelHandle, **inputs: Any) -> Any:
    """A plain transformers forward with attention weights, no hooks of ours."""
    tensors = {k: torch.tensor([v]) for k, v in inputs.items()}
    with torch.no_grad():
        return handle.model(**tensors, output_attentions=True, use_cache=False)


def stacked(weights: tuple[torch.Tensor, ...]) -> np.ndarray:
    return torch.stack(weights)[:, 0].numpy()  # (layers, heads, Tq, Tk)


# -- values against a direct forward --------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("pair", [None, PAIR])
def test_decoder_attention_equals_direct_forward(
    manager: ModelManager, name: str, pair: str | None
) -> None:
    handle = manager.get(name)
    result = attention(handle, TEXT, pair)
    ids_a = handle.tokenizer(TEXT)["input_ids"]
    ids_b = handle.tokenizer(pair, add_special_tokens=False)["input_ids"] if pair else []
    assert result.token_ids == ids_a + ids_b
    assert result.sentence_b_start == (len(ids_a) if pair else None)
    expected = stacked(direct(handle, input_ids=ids_a + ids_b).attentions)
    assert result.attentions.dtype == np.float32
    assert result.attentions.shape == (2, 4, len(ids_a + ids_b), len(ids_a + ids_b))
    np.testing.assert_allclose(result.attentions, expected, rtol=0, atol=EXACT)
    assert list(result.stacks) == ["decoder"] and result.decoder is result.stacks["decoder"]
    assert result.encoder is None and result.cross is None
    assert len(result.tokens) == len(result.token_ids)


def test_grouped_query_model_reports_every_query_head(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    assert (handle.n_heads, handle.n_kv_heads) == (4, 2)
    stack = attention(handle, TEXT).stacks["decoder"]
    assert stack.attentions.shape[1] == 4
    assert stack.keys is not None and stack.queries is not None
    assert stack.keys.shape[1] == stack.queries.shape[1] == 4
    # Query heads 0, 1 read key head 0; heads 2, 3 read key head 1 (transformers' repeat_kv).
    np.testing.assert_array_equal(stack.keys[:, 0], stack.keys[:, 1])
    np.testing.assert_array_equal(stack.keys[:, 2], stack.keys[:, 3])
    assert not np.array_equal(stack.keys[:, 1], stack.keys[:, 2])


def test_encoder_pair_uses_token_types_and_equals_direct_forward(manager: ModelManager) -> None:
    handle = manager.get("tiny-bert")
    result = attention(handle, "Hello there", "General Kenobi")
    encoded = handle.tokenizer("Hello there", "General Kenobi", return_token_type_ids=True)
    types = encoded["token_type_ids"]
    assert result.token_ids == encoded["input_ids"]
    assert result.sentence_b_start == types.index(1) == len("Hello there") + 2  # [CLS] A [SEP]
    assert result.tokens[result.sentence_b_start - 1] == "[SEP]"
    expected = stacked(direct(handle, **encoded).attentions)
    np.testing.assert_allclose(result.attentions, expected, rtol=0, atol=EXACT)
    # The token types matter: without them the weights differ.
    plain = stacked(direct(handle, input_ids=encoded["input_ids"]).attentions)
    assert np.abs(result.attentions - plain).max() > 1e-4
    assert list(result.stacks) == ["encoder"]
    assert np.isnan(result.stacks["encoder"].head_stats["induction"]).all()


@pytest.mark.parametrize("pair", [None, "Guten Tag"])
def test_encoder_decoder_stacks_equal_direct_forward(
    manager: ModelManager, pair: str | None
) -> None:
    handle = manager.get("tiny-t5")
    model = handle.model
    result = attention(handle, TEXT, pair)
    encoder_ids = handle.tokenizer(TEXT)["input_ids"]
    target = torch.tensor([handle.tokenizer(pair)["input_ids"] if pair else encoder_ids])
    decoder_ids = model._shift_right(target)[0].tolist()
    assert decoder_ids[0] == model.config.decoder_start_token_id
    t_enc, t_dec = len(encoder_ids), len(decoder_ids)
    assert (t_dec == t_enc) == (pair is None)
    assert list(result.stacks) == ["encoder", "decoder", "cross"]
    assert result.tokens == result.stacks["encoder"].query_tokens
    assert result.token_ids == encoder_ids and result.sentence_b_start is None
    outputs = direct(handle, input_ids=encoder_ids, decoder_input_ids=decoder_ids)
    expected = {
        "encoder": (outputs.encoder_attentions, (t_enc, t_enc)),
        "decoder": (outputs.decoder_attentions, (t_dec, t_dec)),
        "cross": (outputs.cross_attentions, (t_dec, t_enc)),
    }
    for name, (weights, (t_q, t_k)) in expected.items():
        stack = result.stacks[name]
        assert stack.attentions.shape == (2, 4, t_q, t_k)
        assert (len(stack.query_tokens), len(stack.key_tokens)) == (t_q, t_k)
        np.testing.assert_allclose(stack.attentions, stacked(weights), rtol=0, atol=EXACT)
    cross = result.stacks["cross"]
    assert cross.query_tokens == result.stacks["decoder"].query_tokens
    assert cross.key_tokens == result.tokens
    assert np.isnan(cross.head_stats["induction"]).all()


def test_encoder_decoder_result_has_no_single_attentions(manager: ModelManager) -> None:
    result = attention(manager.get("tiny-t5"), "Hallo")
    with pytest.raises(ValueError, match=r"use \.encoder, \.decoder or \.cross"):
        _ = result.attentions
    assert not hasattr(result, "attentions")  # also an AttributeError
    assert result.encoder is not None and result.decoder is not None and result.cross is not None


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_causal_attention_is_zero_above_the_diagonal(manager: ModelManager, name: str) -> None:
    stack = attention(manager.get(name), TEXT).stacks["decoder"]
    t = stack.attentions.shape[-1]
    above = stack.attentions[..., np.triu_indices(t, k=1)[0], np.triu_indices(t, k=1)[1]]
    assert np.all(above == 0)
    np.testing.assert_allclose(stack.attentions.sum(-1), 1.0, atol=1e-5)


# -- query/key vectors: the golden check ----------------------------------------------------


def rebuilt(stack: AttentionStack) -> np.ndarray:
    """softmax(score_scale * q @ k.T + position_bias + causal mask), written out in torch."""
    assert stack.queries is not None and stack.keys is not None
    q = torch.from_numpy(stack.queries).double()  # (layers, heads, Tq, D)
    k = torch.from_numpy(stack.keys).double()  # (layers, heads, Tk, D)
    scores = stack.score_scale * q @ k.transpose(-1, -2)
    if stack.position_bias is not None:
        scores = scores + torch.from_numpy(stack.position_bias).double()
    if stack.name == "decoder":
        t_q, t_k = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(t_q, t_k, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(scores, dim=-1).numpy()


@pytest.mark.parametrize("name", TINY)
def test_queries_and_keys_reproduce_the_attention(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    result = attention(handle, TEXT, PAIR)
    for stack in result.stacks.values():
        assert stack.queries is not None and stack.keys is not None
        n_layers, n_heads, t_q, t_k = stack.attentions.shape
        assert stack.queries.shape[:3] == (n_layers, n_heads, t_q)
        assert stack.keys.shape[:3] == (n_layers, n_heads, t_k)
        assert stack.queries.dtype == stack.keys.dtype == np.float32
        np.testing.assert_allclose(rebuilt(stack), stack.attentions, rtol=0, atol=GOLDEN)
        np.testing.assert_allclose(
            attention_from_neurons(stack), stack.attentions, rtol=0, atol=GOLDEN
        )


def test_t5_neuron_view_needs_the_position_bias(manager: ModelManager) -> None:
    """T5 does not scale its scores and adds a relative-position bias to self-attention:
    with the bias the rebuild is exact, without it it is not; cross-attention has none."""
    result = attention(manager.get("tiny-t5"), TEXT)
    for name in ("encoder", "decoder"):
        stack = result.stacks[name]
        assert stack.score_scale == 1.0
        assert stack.position_bias is not None
        assert stack.position_bias.shape == (4, *stack.attentions.shape[-2:])
        without = AttentionStack(**{**vars(stack), "position_bias": None})
        assert np.abs(rebuilt(without) - stack.attentions).max() > 1e-3
    assert result.stacks["cross"].position_bias is None


@pytest.mark.parametrize(("name", "scale"), [("tiny-gpt2", 0.25), ("tiny-bert", 0.25)])
def test_score_scale_is_one_over_root_head_dim(
    manager: ModelManager, name: str, scale: float
) -> None:
    stack = next(iter(attention(manager.get(name), TEXT).stacks.values()))
    assert stack.queries is not None and stack.queries.shape[-1] == 16
    assert stack.score_scale == scale


def test_neurons_can_be_skipped(manager: ModelManager) -> None:
    result = attention(manager.get("tiny-t5"), TEXT, neurons=False)
    for stack in result.stacks.values():
        assert stack.queries is None and stack.keys is None and stack.position_bias is None
    meta = attention_meta(result)
    assert not any(s["has_neurons"] for s in meta["stacks"].values())
    assert not any(name.endswith(".neurons") for name in attention_parts(result))
    assert result_from_record(meta, attention_parts(result)) == result


def test_no_hooks_are_left_behind(manager: ModelManager) -> None:
    model = manager.get("tiny-llama").model
    before = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    attention(manager.get("tiny-llama"), TEXT)
    after = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    assert after == before


# -- input checks ---------------------------------------------------------------------------


def test_too_long_input_is_refused_naming_the_limit(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    message = r"^The input is 9 tokens; the limit is 8 \(TZOO_ATTENTION_MAX_TOKENS\)\.$"
    with pytest.raises(InputTooLongError, match=message) as raised:
        attention(handle, "123456789", max_tokens=8)
    assert (raised.value.n_tokens, raised.value.limit) == (9, 8)
    assert len(attention(handle, "12345678", max_tokens=8).tokens) == 8
    with pytest.raises(InputTooLongError, match="is 9 tokens"):  # the pair counts too
        attention(handle, "12345", " 678", max_tokens=8)


def test_the_limit_is_a_setting(manager: ModelManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZOO_ATTENTION_MAX_TOKENS", "5")
    get_settings.cache_clear()
    with pytest.raises(InputTooLongError, match="the limit is 5"):
        attention(manager.get("tiny-bert"), "abcd")  # [CLS] a b c d [SEP]
    assert len(attention(manager.get("tiny-bert"), "abc").tokens) == 5


def test_the_model_context_caps_the_limit(manager: ModelManager) -> None:
    with pytest.raises(InputTooLongError, match=r"limit is 1024 \(the model's context length\)"):
        attention(manager.get("tiny-gpt2"), "x" * 1025, max_tokens=4096)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_refused(manager: ModelManager, text: str) -> None:
    with pytest.raises(EmptyInputError, match="empty"):
        attention(manager.get("tiny-gpt2"), text)


def test_an_empty_pair_means_no_pair(manager: ModelManager) -> None:
    handle = manager.get("tiny-bert")
    assert attention(handle, "abc", "") == attention(handle, "abc")


def test_a_catalogue_name_is_loaded() -> None:
    result = attention("tiny-gpt2", "Hi")
    assert (result.model_name, result.architecture, result.tokens) == (
        "tiny-gpt2",
        "decoder",
        ["H", "i"],
    )


# -- display tokens -------------------------------------------------------------------------


def test_display_tokens_on_the_byte_level_tiny_tokenizer(manager: ModelManager) -> None:
    tokenizer = manager.get("tiny-gpt2").tokenizer
    ids = tokenizer("a b\ncé")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "Ġ", "b", "Ċ", "c", "Ã", "©"]
    # One byte per token here: the two bytes of "é" stay as the tokenizer spells them.
    assert display_tokens(tokenizer, ids) == ["a", " ", "b", "↵", "c", "Ã", "©"]
    eos = tokenizer.eos_token_id
    assert display_tokens(tokenizer, [eos]) == ["<|endoftext|>"]


# -- head statistics ------------------------------------------------------------------------


def pattern(t: int, keys_of: Any) -> np.ndarray:
    """(1, 1, t, t) attention putting all weight of query q on key keys_of(q)."""
    attn = np.zeros((1, 1, t, t), dtype=np.float32)
    for q in range(t):
        attn[0, 0, q, keys_of(q)] = 1.0
    return attn


def test_previous_token_head() -> None:
    stats = head_statistics(pattern(6, lambda q: max(q - 1, 0)), None, causal=True)
    assert stats["previous_token"][0, 0] == 1.0
    assert stats["entropy"][0, 0] == 0.0
    assert stats["mean_distance"][0, 0] == pytest.approx(5 / 6)  # query 0 reads itself
    assert stats["sink"][0, 0] == pytest.approx(1 / 5)  # only query 1's previous is token 0
    assert np.isnan(stats["induction"][0, 0])  # no token ids: not applicable


def test_sink_head() -> None:
    stats = head_statistics(pattern(5, lambda q: 0), [1, 2, 3, 4, 5], causal=True)
    assert stats["sink"][0, 0] == 1.0
    assert stats["mean_distance"][0, 0] == pytest.approx((0 + 1 + 2 + 3 + 4) / 5)
    assert np.isnan(stats["induction"][0, 0])  # no token repeats


def test_uniform_causal_head_entropy() -> None:
    t = 7
    attn = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    stats = head_statistics(attn[None, None].astype(np.float32), None, causal=True)
    expected = np.mean([math.log(q + 1) for q in range(t)])
    assert stats["entropy"][0, 0] == pytest.approx(expected, rel=1e-6)
    expected_sink = np.mean([1 / (q + 1) for q in range(1, t)])
    assert stats["sink"][0, 0] == pytest.approx(expected_sink, rel=1e-6)
    assert stats["previous_token"][0, 0] == pytest.approx(expected_sink, rel=1e-6)


def test_induction_head_on_a_repeated_sequence() -> None:
    block = [7, 3, 9, 4, 8]
    ids = block + block
    n = len(block)
    # Second half: query q (token block[q - n]) attends to the token after its first
    # occurrence, q - n + 1; first half: to itself.
    attn = pattern(2 * n, lambda q: q - n + 1 if q >= n else q)
    stats = head_statistics(attn, ids, causal=True)
    assert stats["induction"][0, 0] == 1.0
    # Not applicable to bidirectional stacks, nor without repeats.
    assert np.isnan(head_statistics(attn, ids, causal=False)["induction"][0, 0])
    assert np.isnan(head_statistics(attn, list(range(2 * n)), causal=True)["induction"]).all()
    # A previous-token head scores 0 here.
    prev = head_statistics(pattern(2 * n, lambda q: max(q - 1, 0)), ids, causal=True)
    assert prev["induction"][0, 0] == 0.0


def test_statistics_by_hand_on_a_crafted_tensor() -> None:
    # Two heads over tokens [5, 6, 5]; query 2 repeats token 5 (first seen at 0), so its
    # induction target is key 1.
    attn = np.array(
        [
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
            [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        ],
        dtype=np.float32,
    )[None]  # (1 layer, 2 heads, 3, 3)
    stats = head_statistics(attn, [5, 6, 5], causal=True)
    h = -(0.5 * math.log(0.5)) * 2
    h2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    expected = {
        "entropy": [(0 + h + h2) / 3, 0.0],
        "mean_distance": [(0 + 0.5 + (0.2 * 2 + 0.3 * 1)) / 3, (0 + 1 + 1) / 3],
        "sink": [(0.5 + 0.2) / 2, (1.0 + 0.0) / 2],
        "previous_token": [(0.5 + 0.3) / 2, (1.0 + 1.0) / 2],
        "induction": [0.3, 1.0],
    }
    assert set(stats) == set(expected)
    for name, values in expected.items():
        assert stats[name].dtype == np.float32 and stats[name].shape == (1, 2)
        np.testing.assert_allclose(stats[name][0], values, rtol=1e-6, err_msg=name)


def test_induction_targets_mark_the_token_after_each_earlier_occurrence() -> None:
    targets = induction_targets([1, 2, 1, 1])
    assert targets[2].tolist() == [False, True, False, False]  # after position 0
    assert targets[3].tolist() == [False, True, False, True]  # after positions 0 and 2
    assert not targets[:2].any()


def test_statistics_of_a_cross_shaped_stack() -> None:
    attn = np.full((2, 3, 4, 6), 1 / 6, dtype=np.float32)  # Tq=4 decoder, Tk=6 encoder
    stats = head_statistics(attn, None, causal=False)
    assert all(values.shape == (2, 3) for values in stats.values())
    np.testing.assert_allclose(stats["entropy"], math.log(6), rtol=1e-6)
    assert np.isnan(stats["induction"]).all()


# -- the record -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_record_round_trip(manager: ModelManager, name: str) -> None:
    result = attention(manager.get(name), TEXT, PAIR)
    meta = attention_meta(result)
    encoded = json.dumps(meta, allow_nan=False)
    parts = attention_parts(result)
    again = result_from_record(json.loads(encoded), parts)
    assert again == result
    assert again.stacks[next(iter(again.stacks))].head_stats.keys() == {
        "entropy",
        "mean_distance",
        "sink",
        "previous_token",
        "induction",
    }
    assert meta["format_version"] == 1
    for stack_name, stack in result.stacks.items():
        info = meta["stacks"][stack_name]
        assert info["n_layers"] == 2 and info["n_heads"] == 4 and info["has_neurons"]
        attn_part = parts[f"{stack_name}.1"]["attention"]
        assert attn_part.dtype == np.float32 and attn_part.shape == stack.attentions.shape[1:]
        assert parts[f"{stack_name}.0.neurons"]["queries"].shape[:2] == (4, len(stack.query_tokens))
        stats = meta["head_stats"][stack_name]
        assert len(stats["entropy"]) == 2 and len(stats["entropy"][0]) == 4
    if name == "tiny-bert":  # NaN statistics are stored as null
        assert meta["head_stats"]["encoder"]["induction"][0] == [None] * 4


def test_record_of_t5_keeps_the_position_bias(manager: ModelManager) -> None:
    result = attention(manager.get("tiny-t5"), TEXT)
    parts = attention_parts(result)
    assert {"encoder.position_bias", "decoder.position_bias"} <= parts.keys()
    assert "cross.position_bias" not in parts
    assert attention_meta(result)["stacks"]["encoder"]["has_position_bias"]
    assert result_from_record(attention_meta(result), parts) == result


def test_record_from_another_format_is_refused(manager: ModelManager) -> None:
    result = attention(manager.get("tiny-gpt2"), "Hi")
    meta = {**attention_meta(result), "format_version": 99}
    with pytest.raises(ValueError, match="format 99"):
        result_from_record(meta, attention_parts(result))
    parts = attention_parts(result)
    del parts["decoder.1"]
    with pytest.raises(ValueError, match=r"no part 'decoder\.1'"):
        result_from_record(attention_meta(result), parts)


def test_results_differ_when_values_differ(manager: ModelManager) -> None:
    result = attention(manager.get("tiny-gpt2"), "Hi")
    other = result_from_record(attention_meta(result), attention_parts(result))
    other.stacks["decoder"].attentions[0, 0, 1, 0] += 0.5
    assert other != result


def test_html_fallback_without_the_renderer(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    result: AttentionResult = attention(manager.get("tiny-t5"), "<b>x</b>")
    monkeypatch.setitem(sys.modules, "tzoo.web.standalone", None)  # import fails
    page = result._repr_html_()
    assert "tiny-t5" in page and "cross" in page and "2 &times; 4 &times; " in page
    assert "<b>x" not in page and "&lt;" in page
