"""The token wheel's pure functions: shaping, segments and the "other" sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from tzoo.analyses.next_token import (
    InvalidSamplingError,
    Sampling,
    sample_other,
    shaped_probabilities,
    token_text,
    wheel_segments,
)
from tzoo.runtime.tiny import build_tokenizer

V = 300


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(7).normal(0, 3, size=V).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("gpt2")


def direct_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


# -- shaping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_plain_shaping_is_softmax_over_temperature(logits: np.ndarray, temperature: float) -> None:
    probs = shaped_probabilities(logits, Sampling(temperature=temperature))
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, direct_softmax(logits, temperature), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_keeps_exactly_k_most_probable(logits: np.ndarray, k: int) -> None:
    probs = shaped_probabilities(logits, Sampling(top_k=k))
    base = direct_softmax(logits)
    kept = np.flatnonzero(probs)
    assert kept.size == k
    assert set(kept) == set(np.argsort(-base)[:k])
    np.testing.assert_allclose(probs[kept], base[kept] / base[kept].sum(), atol=1e-12)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_top_k_ties_break_by_id() -> None:
    probs = shaped_probabilities(np.array([1.0, 2.0, 2.0, 2.0, 0.0]), Sampling(top_k=2))
    assert list(np.flatnonzero(probs)) == [1, 2]


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_minimal_nucleus(logits: np.ndarray, top_p: float) -> None:
    base = direct_softmax(logits)
    probs = shaped_probabilities(logits, Sampling(top_p=top_p))
    kept = np.flatnonzero(probs)
    order = np.argsort(-base, kind="stable")
    assert set(kept) == set(order[: kept.size])  # the most probable tokens
    assert base[kept].sum() >= top_p  # enough mass
    smaller = order[: kept.size - 1]
    assert base[smaller].sum() < top_p  # and no smaller set has it
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(probs[kept], base[kept] / base[kept].sum(), atol=1e-12)


def test_top_p_reaching_the_target_exactly_stops_there() -> None:
    logits = np.log(np.array([0.5, 0.4, 0.1]))
    probs = shaped_probabilities(logits, Sampling(top_p=0.9))
    assert list(np.flatnonzero(probs)) == [0, 1]


def test_order_is_temperature_then_top_k_then_top_p(logits: np.ndarray) -> None:
    sampling = Sampling(temperature=0.7, top_k=20, top_p=0.8)
    probs = shaped_probabilities(logits, sampling)
    base = direct_softmax(logits, 0.7)
    top20 = np.argsort(-base)[:20]
    within = base[top20] / base[top20].sum()
    order = np.argsort(-within)
    n = int(np.searchsorted(np.cumsum(within[order]), 0.8)) + 1
    expected = np.zeros(V)
    chosen = top20[order[:n]]
    expected[chosen] = base[chosen] / base[chosen].sum()
    np.testing.assert_allclose(probs, expected, atol=1e-12)


def test_applied_lists_only_parameters_that_change_the_distribution() -> None:
    assert Sampling().applied() == {}
    assert Sampling(temperature=1.0, top_p=1.0).applied() == {}
    assert Sampling(temperature=0.7, top_k=40).applied() == {"temperature": 0.7, "top_k": 40}
    assert Sampling(top_k=500).applied(vocab_size=300) == {}
    assert Sampling(top_k=5, top_p=0.9).applied(vocab_size=300) == {"top_k": 5, "top_p": 0.9}


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 101}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.inf}, "top_p"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict[str, float], parameter: str) -> None:
    with pytest.raises(InvalidSamplingError, match=parameter) as raised:
        Sampling(**kwargs)  # type: ignore[arg-type]
    assert raised.value.parameter == parameter
    assert isinstance(raised.value, ValueError)


# -- segments --------------------------------------------------------------------------------


def test_wheel_segments_split_at_the_threshold(
    logits: np.ndarray, tokenizer: PreTrainedTokenizerFast
) -> None:
    probs = shaped_probabilities(logits, Sampling(temperature=0.5))
    wheel = wheel_segments(probs, 0.02, tokenizer, n_samples=3)
    shown = [t["probability"] for t in wheel["tokens"]]
    assert shown == sorted(shown, reverse=True)
    assert all(p >= 0.02 for p in shown)
    assert {t["id"] for t in wheel["tokens"]} == set(np.flatnonzero(probs >= 0.02))
    other = wheel["other"]
    below = probs[(probs > 0) & (probs < 0.02)]
    assert other["count"] == below.size
    assert other["probability"] == pytest.approx(below.sum(), abs=1e-12)
    assert sum(shown) + other["probability"] == pytest.approx(1.0, abs=1e-9)
    samples = [s["probability"] for s in other["samples"]]
    assert len(samples) == 3
    assert samples == sorted(below, reverse=True)[:3]
    first = wheel["tokens"][0]
    assert first["text"] == tokenizer.decode([first["id"]])


def test_wheel_segments_break_ties_by_id(tokenizer: PreTrainedTokenizerFast) -> None:
    probs = np.array([0.1, 0.3, 0.1, 0.3, 0.05, 0.1, 0.05])
    wheel = wheel_segments(probs, 0.3, tokenizer, n_samples=2)
    assert [t["id"] for t in wheel["tokens"]] == [1, 3]
    assert [s["id"] for s in wheel["other"]["samples"]] == [0, 2]
    assert wheel["other"]["count"] == 5


def test_wheel_segments_other_counts_only_nonzero_tokens(
    logits: np.ndarray, tokenizer: PreTrainedTokenizerFast
) -> None:
    probs = shaped_probabilities(logits, Sampling(top_k=10))
    wheel = wheel_segments(probs, 0.05, tokenizer)
    assert len(wheel["tokens"]) + wheel["other"]["count"] == 10
    total = sum(t["probability"] for t in wheel["tokens"]) + wheel["other"]["probability"]
    assert total == pytest.approx(1.0, abs=1e-9)


def test_threshold_one_puts_everything_in_other(
    logits: np.ndarray, tokenizer: PreTrainedTokenizerFast
) -> None:
    wheel = wheel_segments(direct_softmax(logits), 1.0, tokenizer)
    assert wheel["tokens"] == []
    assert wheel["other"]["count"] == V
    assert wheel["other"]["probability"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("threshold", [0, -0.1, 1.01, math.nan, True])
def test_bad_thresholds_are_refused(
    logits: np.ndarray, tokenizer: PreTrainedTokenizerFast, threshold: float
) -> None:
    probs = direct_softmax(logits)
    with pytest.raises(InvalidSamplingError, match="threshold must be > 0 and <= 1"):
        wheel_segments(probs, threshold, tokenizer)
    with pytest.raises(InvalidSamplingError, match="threshold"):
        sample_other(probs, threshold, np.random.default_rng(0))


def test_token_text_is_the_exact_decoding(tokenizer: PreTrainedTokenizerFast) -> None:
    space = tokenizer.get_vocab()["Ġ"]
    assert token_text(tokenizer, space) == " "
    assert token_text(tokenizer, 0) == "<|endoftext|>"


# -- the "other" sampler ---------------------------------------------------------------------


def synthetic_distribution() -> np.ndarray:
    """5 tokens above a 0.05 threshold, 10 below with unequal weights, and zeros."""
    above = np.array([0.25, 0.15, 0.12, 0.10, 0.08])  # 0.70
    below = np.array([0.049, 0.045, 0.04, 0.035, 0.03, 0.03, 0.025, 0.02, 0.016, 0.01])  # 0.30
    probs = np.zeros(40)
    probs[[3, 9, 14, 20, 33]] = above
    probs[[0, 1, 5, 7, 12, 18, 22, 27, 30, 39]] = below
    return probs


def chi_square_critical(df: int, z: float = 3.090) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: p = 0.999)."""
    a = 2.0 / (9.0 * df)
    return float(df * (1.0 - a + z * math.sqrt(a)) ** 3)


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_other_sampler_matches_the_renormalised_tail() -> None:
    probs = synthetic_distribution()
    rng = np.random.default_rng(2024)
    n = 20_000
    draws = np.array([sample_other(probs, 0.05, rng) for _ in range(n)])
    tail = np.flatnonzero((probs > 0) & (probs < 0.05))
    assert set(draws) <= set(tail)  # never a wheel token, never a zero
    counts = np.array([(draws == i).sum() for i in tail])
    expected = n * probs[tail] / probs[tail].sum()
    critical = chi_square_critical(tail.size - 1)
    assert critical == pytest.approx(27.88, abs=0.3)  # the table's value for df=9
    assert chi_square(counts, expected) < critical
    # The test has power: the same draws are far from a uniform tail.
    assert chi_square(counts, np.full(tail.size, n / tail.size)) > 10 * critical


def test_other_sampler_is_reproducible_with_a_seed() -> None:
    probs = synthetic_distribution()
    first = [sample_other(probs, 0.05, np.random.default_rng(s)) for s in range(20)]
    again = [sample_other(probs, 0.05, np.random.default_rng(s)) for s in range(20)]
    assert first == again
    assert len(set(first)) > 1


def test_other_sampler_refuses_an_empty_tail() -> None:
    probs = np.array([0.5, 0.5, 0.0])
    with pytest.raises(InvalidSamplingError, match="nothing below the threshold"):
        sample_other(probs, 0.3, np.random.default_rng(0))
