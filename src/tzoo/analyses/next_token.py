"""The token wheel's analysis: a next-token distribution shaped by temperature, top-k and
top-p, split into the tokens at or above a probability threshold and one "other" segment.

Pure functions over a logits vector (V,) and a tokenizer: no model, no I/O. The session
layer (``tzoo.service.wheel``) keeps the logits of each context and calls these.

Every distribution here is float64 and sums to 1 (within rounding): the wheel's segments,
tokens plus "other", always cover the whole circle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_TEMPERATURE = 100.0
# top-p compares cumulative sums against the target; this much rounding slack keeps
# top_p=0.9 from taking one token too many when the nucleus sums to 0.8999999999999999.
_TOP_P_SLACK = 1e-12


class InvalidSamplingError(ValueError):
    """A sampling parameter or threshold is out of range; the message names it and the range."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class Sampling:
    """How the wheel's distribution is shaped: softmax(logits / temperature), then top-k,
    then top-p (nucleus), renormalised after each cut."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not _is_number(t) or not (0 < t <= MAX_TEMPERATURE):
            raise InvalidSamplingError(
                f"temperature must be > 0 and <= {MAX_TEMPERATURE:g}; got {t!r}.", "temperature"
            )
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InvalidSamplingError(f"top_k must be an integer >= 1; got {k!r}.", "top_k")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not _is_number(p) or not (0 < p <= 1)):
            raise InvalidSamplingError(f"top_p must be > 0 and <= 1; got {p!r}.", "top_p")

    def applied(self, vocab_size: int | None = None) -> dict[str, float | int]:
        """The parameters that change the distribution: temperature other than 1, top_k
        below the vocabulary size (when known), top_p below 1."""
        applied: dict[str, float | int] = {}
        if self.temperature != 1.0:
            applied["temperature"] = float(self.temperature)
        if self.top_k is not None and (vocab_size is None or self.top_k < vocab_size):
            applied["top_k"] = int(self.top_k)
        if self.top_p is not None and self.top_p < 1.0:
            applied["top_p"] = float(self.top_p)
        return applied


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in (0, 1], else InvalidSamplingError."""
    ok = not isinstance(threshold, bool) and _is_number(threshold) and 0 < threshold <= 1
    if not ok:
        raise InvalidSamplingError(
            f"threshold must be > 0 and <= 1; got {threshold!r}.", "threshold"
        )
    return float(threshold)


# -- shaping ---------------------------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 softmax(logits / temperature) of a (V,) vector."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    exps = np.exp(scaled - np.max(scaled))
    return exps / exps.sum()


def ranked(probs: np.ndarray) -> np.ndarray:
    """Token ids by probability, highest first; equal probabilities by id."""
    return np.argsort(-probs, kind="stable")


def _keep(probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    kept = np.zeros_like(probs)
    kept[ids] = probs[ids]
    return kept / kept.sum()


def top_k_filter(probs: np.ndarray, k: int) -> np.ndarray:
    """Only the k most probable tokens (ties by id), renormalised."""
    if k >= probs.size:
        return probs
    return _keep(probs, ranked(probs)[:k])


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus: the smallest set of most probable tokens (ties by id) whose mass is
    at least ``top_p``, renormalised."""
    if top_p >= 1.0:
        return probs
    order = ranked(probs)
    cumulative = np.cumsum(probs[order])
    n = int(np.searchsorted(cumulative, top_p - _TOP_P_SLACK, side="left")) + 1
    return _keep(probs, order[: min(n, probs.size)])


def shaped_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution the wheel shows (V,) float64: softmax(logits / T), then top-k,
    then top-p, renormalised."""
    probs = softmax(logits, sampling.temperature)
    if sampling.top_k is not None:
        probs = top_k_filter(probs, sampling.top_k)
    if sampling.top_p is not None:
        probs = top_p_filter(probs, sampling.top_p)
    return probs


# -- the wheel -------------------------------------------------------------------------------


def token_text(tokenizer: Any, token_id: int) -> str:
    """The display text of one token id: exactly what decoding it alone gives."""
    return str(tokenizer.decode([int(token_id)], skip_special_tokens=False))


def _entries(probs: np.ndarray, ids: np.ndarray, tokenizer: Any) -> list[dict[str, Any]]:
    return [
        {"id": int(i), "text": token_text(tokenizer, int(i)), "probability": float(probs[i])}
        for i in ids
    ]


def wheel_segments(
    probs: np.ndarray, threshold: float, tokenizer: Any, *, n_samples: int = 5
) -> dict[str, Any]:
    """Split ``probs`` (V,) into the wheel's segments.

    ``tokens``: every token with probability >= threshold, most probable first (ties by
    id). ``other``: the total probability below the threshold, how many tokens
    (with 0 < p < threshold) it holds, and its ``n_samples`` most probable tokens.
    """
    threshold = check_threshold(threshold)
    above = np.flatnonzero(probs >= threshold)
    below = np.flatnonzero((probs > 0) & (probs < threshold))
    return {
        "tokens": _entries(probs, _by_probability(probs, above), tokenizer),
        "other": {
            "probability": float(probs[below].sum()),
            "count": int(below.size),
            "samples": _entries(probs, _most_probable(probs, below, n_samples), tokenizer),
        },
    }


def _by_probability(probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (ascending) ordered by probability, highest first, ties by id."""
    return ids[np.argsort(-probs[ids], kind="stable")]


def _most_probable(probs: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` most probable of ``ids`` (ascending), ties by id, without sorting them
    all: a partition finds the n-th largest probability, then only those at or above it
    are sorted."""
    if n <= 0 or ids.size == 0:
        return ids[:0]
    if ids.size > n:
        nth = -np.partition(-probs[ids], n - 1)[n - 1]
        ids = ids[probs[ids] >= nth]
    return _by_probability(probs, ids)[:n]


def sample_other(probs: np.ndarray, threshold: float, rng: np.random.Generator) -> int:
    """One token id drawn from the below-threshold tokens (0 < p < threshold), with
    probabilities renormalised over them."""
    threshold = check_threshold(threshold)
    ids = np.flatnonzero((probs > 0) & (probs < threshold))
    if ids.size == 0:
        raise InvalidSamplingError(
            "nothing below the threshold: every token with any probability is on the wheel.",
            "threshold",
        )
    weights = probs[ids] / probs[ids].sum()
    return int(rng.choice(ids, p=weights))
