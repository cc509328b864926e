"""The logit lens on the tiny models, against the models' own outputs and a direct numpy
computation from the hooked residual stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tzoo_testing import make_settings

import tzoo
from tzoo.analyses.attention import EmptyInputError, InputTooLongError
from tzoo.analyses.lens import (
    LensResult,
    LensUnsupportedError,
    Readout,
    kl_to_final,
    logit_lens,
    residual_stack,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import run_with_cache
from tzoo.runtime.manager import ModelManager

CAUSAL = ["tiny-gpt2", "tiny-llama"]
TEXT = "The cat sat on the mat. The cat"


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("lens")))


def model_probs(handle: ModelHandle, ids: list[int]) -> np.ndarray:
    """(T, V) the model's own next-token distribution, from a plain forward pass."""
    with torch.no_grad():
        logits = handle.model(torch.tensor([ids]), use_cache=False).logits[0]
    return torch.softmax(logits.double(), dim=-1).numpy()


def direct_log_probs(handle: ModelHandle, residual: np.ndarray) -> np.ndarray:
    """log softmax(lm_head(final_norm(h))) for residuals (T, d), written out in numpy
    (float64) from the weights: RMSNorm for llama, LayerNorm for GPT-2."""
    x = residual.astype(np.float64)
    model: Any = handle.model
    if handle.family == "llama":
        norm = model.model.norm
        x = x / np.sqrt((x**2).mean(-1, keepdims=True) + norm.variance_epsilon)
        x = x * norm.weight.detach().double().numpy()
    else:
        norm = model.transformer.ln_f
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + norm.eps)
        x = x * norm.weight.detach().double().numpy() + norm.bias.detach().double().numpy()
    logits = x @ model.lm_head.weight.detach().double().numpy().T  # (T, V)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", CAUSAL)
def test_last_layer_is_the_model_output_distribution(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    # k = the whole vocabulary: the last layer's top-k is then the full distribution.
    result = logit_lens(handle, TEXT, k=handle.vocab_size)
    expected = model_probs(handle, result.token_ids)  # (T, V)
    last = np.zeros_like(expected)
    np.put_along_axis(last, result.top_ids[-1], result.top_probs[-1], axis=-1)
    np.testing.assert_allclose(last, expected, atol=1e-5, rtol=0)
    assert np.all(result.kl_to_final[-1] == 0)
    assert np.all(result.final_token_rank[-1] == 0)
    np.testing.assert_array_equal(result.final_ids, expected.argmax(-1))
    np.testing.assert_allclose(result.final_probability[-1], expected.max(-1), atol=1e-6)


@pytest.mark.parametrize("name", CAUSAL)
def test_every_layer_matches_a_direct_computation(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    result = logit_lens(handle, TEXT, k=5)
    inputs = {"input_ids": torch.tensor([result.token_ids])}
    _, cache = run_with_cache(handle, inputs, attentions=False)
    residuals = cache.residual_stack().numpy()[:, 0]  # (L + 1, T, d), unnormed
    log_p = direct_log_probs(handle, residuals[-1])
    final = log_p.argmax(-1)
    for layer in result.layers:
        log_q = direct_log_probs(handle, residuals[layer])
        q = np.exp(log_q)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        entropy = -(q * log_q).sum(-1)
        chosen = np.take_along_axis(log_q, final[:, None], -1)
        rank = (log_q > chosen).sum(-1)
        top = np.sort(q, axis=-1)[:, ::-1][:, :5]
        np.testing.assert_allclose(result.kl_to_final[layer], kl, atol=1e-4)
        np.testing.assert_allclose(result.entropy[layer], entropy, atol=1e-4)
        np.testing.assert_array_equal(result.final_token_rank[layer], rank)
        np.testing.assert_allclose(result.final_probability[layer], np.exp(chosen[:, 0]), atol=1e-6)
        np.testing.assert_allclose(result.top_probs[layer], top, atol=1e-6)
        np.testing.assert_allclose(
            np.take_along_axis(q, result.top_ids[layer], -1), result.top_probs[layer], atol=1e-6
        )


def test_shapes_order_and_tokens(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    result = logit_lens(handle, TEXT, k=3)
    n_positions = len(result.token_ids)
    assert isinstance(result, LensResult)
    assert result.lens == "logit"
    assert result.layers == [0, 1, 2] and result.n_layers == handle.n_layers
    assert result.top_ids.shape == result.top_probs.shape == (3, n_positions, 3)
    for name in ("kl_to_final", "entropy", "final_token_rank", "final_probability"):
        assert getattr(result, name).shape == (3, n_positions)
    assert np.all(np.diff(result.top_probs, axis=-1) <= 0)  # most probable first
    assert np.all(result.kl_to_final >= -1e-6)
    assert result.tokens[0] == "<s>" and result.tokens[1:4] == ["T", "h", "e"]
    pairs = result.top_tokens(-1, -1)
    assert len(pairs) == 3 and all(isinstance(t, str) and 0 < p <= 1 for t, p in pairs)
    assert pairs[0][1] == pytest.approx(float(result.final_probability[-1, -1]))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-t5"])
def test_models_without_a_decoder_head_are_refused(manager: ModelManager, name: str) -> None:
    with pytest.raises(LensUnsupportedError, match="needs a decoder with an unembedding"):
        logit_lens(manager.get(name), TEXT)


def test_bad_input_is_refused(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    with pytest.raises(InputTooLongError, match="the limit is 8"):
        logit_lens(handle, TEXT, max_tokens=8)
    with pytest.raises(EmptyInputError):
        logit_lens(handle, "   ")
    with pytest.raises(ValueError, match="k must be"):
        logit_lens(handle, TEXT, k=0)


def test_the_python_api_loads_a_model_by_name() -> None:
    result = tzoo.logit_lens("tiny-gpt2", TEXT, k=2)
    assert result.model_name == "tiny-gpt2"
    assert result.top_ids.shape == (3, len(result.token_ids), 2)


def test_kl_alone_matches_the_lens(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    result = logit_lens(handle, TEXT)
    stack = residual_stack(handle, torch.tensor([result.token_ids]))[:, 0]  # (L + 1, T, d)
    kl = kl_to_final(Readout.of(handle), stack).numpy()
    np.testing.assert_allclose(kl, result.kl_to_final, atol=1e-6)
