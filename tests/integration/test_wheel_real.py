"""The token wheel on SmolLM2-135M: exact probabilities, the key/value cache against a
full recompute, and a sensible prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tzoo.analyses.next_token import Sampling
from tzoo.runtime.manager import ModelManager
from tzoo.service.wheel import SessionStore, WheelSession

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PLAIN = Sampling()


@pytest.fixture(scope="module")
def store(real_manager: ModelManager) -> SessionStore:
    return SessionStore(real_manager.settings, real_manager)


def session_on(store: SessionStore, prompt: str) -> WheelSession:
    session = store.create(MODEL)
    session.set_prompt(prompt)
    return session


def direct_probs(manager: ModelManager, ids: list[int]) -> np.ndarray:
    model = manager.get(MODEL).model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1).numpy()


def test_paris_is_the_top_segment(store: SessionStore) -> None:
    session = session_on(store, "The capital of France is")
    wheel = session.next_token_probs(sampling=PLAIN, threshold=0.05)
    assert wheel["tokens"][0]["text"] == " Paris"
    assert wheel["tokens"][0]["probability"] > 0.5
    total = sum(t["probability"] for t in wheel["tokens"]) + wheel["other"]["probability"]
    assert total == pytest.approx(1.0, abs=1e-9)


def test_probabilities_equal_a_direct_softmax(
    real_manager: ModelManager, store: SessionStore
) -> None:
    session = session_on(store, "The capital of France is")
    tokenizer = real_manager.get(MODEL).tokenizer
    for token in tokenizer(" Paris, and the capital", add_special_tokens=False)["input_ids"]:
        session.append(token, sampling=PLAIN, threshold=0.05)
    expected = direct_probs(real_manager, session.context_ids())
    np.testing.assert_allclose(session.distribution(PLAIN), expected, atol=1e-4, rtol=0)


def test_incremental_equals_full_recompute(store: SessionStore) -> None:
    session = session_on(store, "Once upon a time")
    draw = Sampling(temperature=1.2)  # every token has some probability: "other" is never empty
    rng = np.random.default_rng(3)
    for i in range(24):
        if i % 4 == 3:
            session.undo()
        else:
            session.append_other(sampling=draw, threshold=0.2, seed=int(rng.integers(1000)))
    for _ in range(3):
        session.undo()
    np.testing.assert_allclose(
        session.distribution(PLAIN), session.full_recompute_distribution(PLAIN), atol=1e-5
    )
    shaped = Sampling(temperature=0.8, top_p=0.95)
    np.testing.assert_allclose(
        session.distribution(shaped), session.full_recompute_distribution(shaped), atol=1e-5
    )


def test_pieces_are_kept_as_appended(real_manager: ModelManager, store: SessionStore) -> None:
    """ " Par" + "is" stays two tokens although " Paris" is one."""
    tokenizer = real_manager.get(MODEL).tokenizer
    pieces = tokenizer.convert_tokens_to_ids(["ĠPar", "is"])
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"] not in ([pieces], pieces)
    session = session_on(store, "The capital of France is")
    for token in pieces:
        session.append(token, sampling=PLAIN, threshold=0.05)
    assert session.context_ids() == session.prompt_ids + pieces
    assert session.snapshot()["text"] == "The capital of France is Paris"
    np.testing.assert_allclose(
        session.distribution(PLAIN), direct_probs(real_manager, session.context_ids()), atol=1e-4
    )
