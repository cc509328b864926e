"""The logit and tuned lenses on SmolLM2-135M (30 layers, vocabulary 49152)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tzoo.analyses.corpus import build_corpus, split_corpus
from tzoo.analyses.lens import Readout, logit_lens, residual_stack
from tzoo.analyses.tuned_lens import evaluate_kl, kl_table, train_tuned_lens
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

pytestmark = pytest.mark.slow

# A short training that must already beat the logit lens at every layer: 24 sampled
# documents of 64 tokens (seed 0), 3 held out; 24 steps of 2 windows of 64 tokens.
# The readout runs in bfloat16 where the CPU has bf16 units (about twice as fast).
TRAINING = {"steps": 24, "lr": 5e-4, "seq_len": 64, "batch_size": 2, "seed": 0}
BF16 = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


@pytest.fixture(scope="module")
def smollm2(real_manager: ModelManager) -> ModelHandle:
    return real_manager.get("smollm2-135m")


def test_last_layer_is_the_model_output(smollm2: ModelHandle) -> None:
    text = "The capital of France is Paris. It is known for its museums and"
    result = logit_lens(smollm2, text, k=20)
    ids = torch.tensor([result.token_ids])
    with torch.no_grad():
        outputs = smollm2.model(ids, output_hidden_states=True, use_cache=False)
    expected = torch.softmax(outputs.logits[0].float(), dim=-1)  # (T, V)
    top = expected.topk(20, dim=-1)
    np.testing.assert_allclose(result.top_probs[-1], top.values.numpy(), atol=1e-5)
    np.testing.assert_array_equal(result.top_ids[-1], top.indices.numpy())
    assert np.all(result.kl_to_final[-1] == 0) and np.all(result.final_token_rank[-1] == 0)

    # The whole last-layer distribution, through the same readout the lens uses.
    readout = Readout.of(smollm2)
    stack = residual_stack(smollm2, ids)[:, 0]  # (L + 1, T, d), unnormed
    with torch.no_grad():
        ours = torch.softmax(readout.logits(stack[-1]), dim=-1)
        # transformers' last hidden state is normed already: norming it again is wrong.
        hidden = outputs.hidden_states
        twice = torch.softmax(readout.logits(hidden[-1][0]), dim=-1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (twice - expected).abs().max() > 1e-2
    for layer in range(smollm2.n_layers):  # below the last, both are the unnormed residual
        torch.testing.assert_close(stack[layer], hidden[layer][0], atol=1e-5, rtol=1e-5)


def test_paris_rises_through_the_layers(smollm2: ModelHandle) -> None:
    result = logit_lens(smollm2, "The capital of France is")
    (paris,) = smollm2.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert int(result.final_ids[-1]) == paris
    ranks = result.final_token_rank[:, -1]
    print("rank of ' Paris' by layer:", ranks.tolist())
    n = smollm2.n_layers
    assert ranks[-1] == 0 and max(ranks[-3:]) <= 10
    assert max(ranks[-n // 4 :]) < min(ranks[: n // 2])  # last quarter far above the first half
    assert np.corrcoef(result.layers, np.log1p(ranks))[0, 1] < -0.7
    assert result.top_tokens(-1, -1)[0][0] == " Paris"


# About 5 min alone on 2 cores; the default 600 s limit is too tight on a busy machine.
@pytest.mark.timeout(1800)
def test_a_short_tuned_lens_training_beats_the_logit_lens(
    smollm2: ModelHandle, real_model_cache: Path
) -> None:
    started = time.perf_counter()
    cache = real_model_cache / "corpus"  # sampled once per test session
    docs = build_corpus(smollm2, n_docs=24, tokens_per_doc=64, seed=0, cache_dir=cache)
    train, heldout = split_corpus(docs, 0.125, seed=0)
    sampled = time.perf_counter()
    lens = train_tuned_lens(smollm2, train, readout_dtype=BF16, **TRAINING)
    trained = time.perf_counter()
    logit = evaluate_kl(smollm2, None, heldout, seq_len=64)
    tuned = evaluate_kl(smollm2, lens, heldout, seq_len=64)
    done = time.perf_counter()
    print(
        f"\ncorpus {sampled - started:.1f} s, training {trained - sampled:.1f} s, "
        f"evaluation {done - trained:.1f} s (bf16 readout: {BF16 is not None})"
    )
    print("layer  logit KL  tuned KL")
    for row in kl_table(logit, tuned):
        print(f"{row['layer']:5d}  {row['logit_kl']:8.3f}  {row['tuned_kl']:8.3f}")
    assert logit[-1] == tuned[-1] == 0
    worse = [layer for layer in range(smollm2.n_layers) if not tuned[layer] < logit[layer]]
    assert worse == [], f"no improvement at layers {worse}"
