"""The lens service's small parts: the rate limiter, batch splitting, messages, and the
batched logit lens against one text at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tzoo
from tzoo.analyses.attention import EmptyInputError
from tzoo.analyses.lens import logit_lens_batch
from tzoo.service.lens_jobs import Job, JobOptions, _by_padded_tokens, message
from tzoo.service.model_groups import ModelGroup
from tzoo.service.rate_limit import RateLimitedError, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_the_limit_per_minute_per_client() -> None:
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimitedError) as error:
        limiter.check("a")
    assert error.value.retry_after == 60
    limiter.check("b")  # another client has its own window
    clock.now += 20
    with pytest.raises(RateLimitedError) as error:
        limiter.check("a")
    assert error.value.retry_after == 40  # until the oldest hit leaves the window
    clock.now += 40.5
    limiter.check("a")  # refused attempts were not counted


def test_rate_limit_of_zero_is_off() -> None:
    limiter = RateLimiter(0)
    for _ in range(1000):
        limiter.check("a")


def job(n: int) -> Job:
    group = ModelGroup("g", "tiny-llama", "", Path("."), None)
    return Job(id=str(n), analysis="logit_lens", group=group, text="x", options=JobOptions())


def test_batches_stay_within_the_padded_token_budget() -> None:
    jobs = [(job(i), n) for i, n in enumerate([10, 40, 5, 30, 100])]
    batches = _by_padded_tokens(jobs, budget=100)
    for batch in batches:
        lengths = [dict((j.id, n) for j, n in jobs)[j.id] for j in batch]
        assert len(batch) == 1 or len(batch) * max(lengths) <= 100
    assert sorted(j.id for b in batches for j in b) == sorted(j.id for j, _ in jobs)
    assert [j.id for j in batches[-1]] == ["4"]  # longer than the budget: alone


def test_message_pastes_the_encoded_result() -> None:
    text = message({"type": "completed", "request_id": "r"}, '{"rows": [1, 2]}')
    assert json.loads(text) == {"type": "completed", "request_id": "r", "result": {"rows": [1, 2]}}
    assert json.loads(message({"type": "x"})) == {"type": "x"}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_logit_lens_equals_one_text_at_a_time(name: str) -> None:
    texts = ["A longer first text, with commas.", "Hi", "Three little words"]
    batched = logit_lens_batch(name, texts, k=4)
    for text, result in zip(texts, batched, strict=True):
        alone = tzoo.logit_lens(name, text, k=4)
        assert result.token_ids == alone.token_ids and result.text == text
        np.testing.assert_array_equal(result.top_ids, alone.top_ids)
        np.testing.assert_allclose(result.kl_to_final, alone.kl_to_final, atol=1e-5)
        np.testing.assert_allclose(result.top_probs, alone.top_probs, atol=1e-6)


def test_batched_logit_lens_refuses_an_empty_text() -> None:
    with pytest.raises(EmptyInputError):
        logit_lens_batch("tiny-llama", ["fine", "  "])
    assert logit_lens_batch("tiny-llama", []) == []


def test_lens_result_to_dict_is_json_and_rounded() -> None:
    result = tzoo.logit_lens("tiny-llama", "Round me", k=2)
    data = json.loads(json.dumps(result.to_dict(decimals=3)))
    assert data["top_ids"] == result.top_ids.tolist()
    assert np.allclose(data["top_probs"], result.top_probs, atol=5e-4)
    assert all(len(str(p)) <= 5 for layer in data["entropy"] for p in layer)
    assert data["token_strings"] == {str(k): v for k, v in result.token_strings.items()}
