"""Token-wheel sessions on the tiny GPT-2 and LLaMA models: exact probabilities, the
key/value cache against a full recompute, undo, limits, expiry and isolation."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses.next_token import InvalidSamplingError, Sampling
from tzoo.runtime.manager import ModelManager
from tzoo.service.wheel import (
    ContextTooLongError,
    SessionNotFoundError,
    SessionStore,
    TooManySessionsError,
    WheelSession,
)

DECODERS = ["tiny-gpt2", "tiny-llama"]
PLAIN = Sampling()
THRESHOLD = 0.005  # the tiny models' distributions are close to uniform over 259 tokens


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("wheel")))


def store_for(manager: ModelManager, tmp_path: Path, **settings: object) -> SessionStore:
    clock = settings.pop("clock", FakeClock())
    history = settings.pop("logit_history", 16)
    return SessionStore(
        make_settings(tmp_path, **settings),
        manager,
        clock=clock,  # type: ignore[arg-type]
        logit_history=history,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(manager: ModelManager, tmp_path: Path) -> SessionStore:
    return store_for(manager, tmp_path)


def direct_probs(manager: ModelManager, name: str, ids: list[int]) -> np.ndarray:
    model = manager.get(name).model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1).numpy()


def started(store: SessionStore, name: str, prompt: str = "The wheel turns") -> WheelSession:
    session = store.create(name)
    session.set_prompt(prompt)
    return session


# -- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS)
def test_probabilities_equal_a_direct_softmax(
    manager: ModelManager, store: SessionStore, name: str
) -> None:
    session = started(store, name)
    for token in (72, 105, 33):
        session.append(token, sampling=PLAIN, threshold=THRESHOLD)
    expected = direct_probs(manager, name, session.context_ids())
    np.testing.assert_allclose(session.distribution(PLAIN), expected, atol=1e-4, rtol=0)
    hot = session.distribution(Sampling(temperature=2.0))
    model = manager.get(name).model
    with torch.no_grad():
        logits = model(torch.tensor([session.context_ids()])).logits[0, -1].double()
    np.testing.assert_allclose(hot, torch.softmax(logits / 2.0, -1).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_prompt_is_tokenised_with_the_models_special_tokens(
    manager: ModelManager, store: SessionStore, name: str
) -> None:
    session = started(store, name, "abc")
    tokenizer = manager.get(name).tokenizer
    assert session.prompt_ids == tokenizer("abc")["input_ids"]
    if name == "tiny-llama":
        assert session.prompt_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("history", [0, 3, 16])
@pytest.mark.parametrize("name", DECODERS)
def test_incremental_equals_full_recompute_through_appends_and_undos(
    manager: ModelManager, tmp_path: Path, name: str, history: int
) -> None:
    session = started(store_for(manager, tmp_path, logit_history=history), name)
    rng = np.random.default_rng(11)
    ops = rng.permutation(["append"] * 30 + ["undo"] * 10)
    expected_context = list(session.prompt_ids)
    sampling = Sampling(temperature=0.8, top_k=50)
    for i, op in enumerate(ops):
        if op == "append":
            token = int(rng.integers(session.vocab_size))
            before = session.distribution(sampling)
            step = session.append(token, sampling=sampling, threshold=THRESHOLD)
            assert step.probability == pytest.approx(before[token], abs=1e-15)
            expected_context.append(token)
        elif session.undo() is not None:
            expected_context.pop()
        assert session.context_ids() == expected_context
        if i % 4 == 0 or i == len(ops) - 1:
            np.testing.assert_allclose(
                session.distribution(PLAIN), session.full_recompute_distribution(PLAIN), atol=1e-5
            )
    np.testing.assert_allclose(
        session.distribution(PLAIN), direct_probs(manager, name, expected_context), atol=1e-4
    )
    kept = session.memory_bytes()["logits"] // (session.vocab_size * 4)
    assert kept <= history + 2  # the prompt's, the current and `history` earlier ones


@pytest.mark.parametrize("name", DECODERS)
def test_undo_goes_back_to_the_prompt_and_then_returns_none(store: SessionStore, name: str) -> None:
    session = started(store, name)
    at_prompt = session.distribution(PLAIN)
    steps = [session.append(t, sampling=PLAIN, threshold=THRESHOLD) for t in (70, 71, 72, 73)]
    undone = [session.undo() for _ in steps]
    assert undone == steps[::-1]
    assert session.context_ids() == session.prompt_ids
    assert session.steps == []
    assert session.undo() is None
    np.testing.assert_allclose(session.distribution(PLAIN), at_prompt, atol=1e-6)
    np.testing.assert_allclose(at_prompt, session.full_recompute_distribution(PLAIN), atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_appends_are_ids_never_retokenised(
    manager: ModelManager, store: SessionStore, name: str
) -> None:
    tokenizer = manager.get(name).tokenizer
    session = started(store, name, "caf")
    e_acute = tokenizer("é", add_special_tokens=False)["input_ids"]  # two byte tokens
    assert len(e_acute) == 2
    lone_lead, letter = e_acute[0], tokenizer("a", add_special_tokens=False)["input_ids"][0]
    appended = [*e_acute, lone_lead, letter]
    for token in appended:
        session.append(token, sampling=PLAIN, threshold=THRESHOLD)
    assert session.context_ids() == session.prompt_ids + appended
    text = session.snapshot()["text"]
    assert text == "café\ufffda"  # a lone UTF-8 lead byte shows as U+FFFD
    # Tokenising that text again would shift tokens (U+FFFD is three bytes):
    assert tokenizer(text)["input_ids"] != session.context_ids()
    np.testing.assert_allclose(
        session.distribution(PLAIN), direct_probs(manager, name, session.context_ids()), atol=1e-4
    )


def test_other_choice_is_drawn_below_the_threshold_and_reproducible(store: SessionStore) -> None:
    first, second = started(store, "tiny-llama"), started(store, "tiny-llama")
    sampling = Sampling(temperature=0.5)
    threshold = 0.01
    probs = first.distribution(sampling)
    a = first.append_other(sampling=sampling, threshold=threshold, seed=42)
    b = second.append_other(sampling=sampling, threshold=threshold, seed=42)
    assert a.token_id == b.token_id
    assert a.choice == "other" and a.seed == 42
    assert 0 < probs[a.token_id] < threshold
    assert a.probability == pytest.approx(probs[a.token_id])
    assert a.sampling == {"temperature": 0.5}
    assert a.wheel["other"]["probability"] == pytest.approx(probs[probs < threshold].sum())
    draws = {first.append_other(sampling=sampling, threshold=threshold, seed=None).token_id}
    assert draws  # unseeded draws work too
    with pytest.raises(InvalidSamplingError, match="seed"):
        first.append_other(sampling=sampling, threshold=threshold, seed=-1)
    with pytest.raises(InvalidSamplingError, match="nothing below the threshold"):
        first.append_other(sampling=Sampling(top_k=3), threshold=0.01, seed=0)


def test_next_token_probs_reports_the_wheel_and_applied_sampling(store: SessionStore) -> None:
    session = started(store, "tiny-gpt2")
    shown = session.next_token_probs(sampling=Sampling(top_k=20, top_p=1.0), threshold=0.05)
    assert shown["sampling"] == {"top_k": 20}
    assert shown["threshold"] == 0.05
    assert shown["context_tokens"] == len(session.prompt_ids)
    assert len(shown["tokens"]) + shown["other"]["count"] == 20
    total = sum(t["probability"] for t in shown["tokens"]) + shown["other"]["probability"]
    assert total == pytest.approx(1.0, abs=1e-9)


# -- bad input -------------------------------------------------------------------------------


def test_bad_appends_are_refused_and_change_nothing(store: SessionStore) -> None:
    session = started(store, "tiny-gpt2")
    context = session.context_ids()
    for bad in (-1, session.vocab_size, True, 3.0):
        with pytest.raises(ValueError, match="token_id must be an integer from 0 to 256"):
            session.append(bad, sampling=PLAIN, threshold=THRESHOLD)  # type: ignore[arg-type]
    with pytest.raises(InvalidSamplingError, match="threshold"):
        session.append(5, sampling=PLAIN, threshold=0)
    with pytest.raises(ValueError, match="choice"):
        session.append(5, sampling=PLAIN, threshold=THRESHOLD, choice="wild")  # type: ignore[arg-type]
    assert session.context_ids() == context


def test_empty_prompt_needs_a_start_token(store: SessionStore) -> None:
    gpt2 = store.create("tiny-gpt2")
    with pytest.raises(ValueError, match="The prompt is empty"):
        gpt2.set_prompt("")
    with pytest.raises(ValueError, match="Set a prompt first"):
        gpt2.distribution(PLAIN)
    llama = store.create("tiny-llama")
    llama.set_prompt("")  # just <s>
    assert len(llama.context_ids()) == 1
    assert llama.distribution(PLAIN).sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "kind"), [("tiny-bert", "encoder"), ("tiny-t5", "encoder-decoder")]
)
def test_non_decoder_models_are_refused(store: SessionStore, name: str, kind: str) -> None:
    with pytest.raises(
        ValueError, match=rf"needs a decoder \(causal\) model; {name} is an {kind}\."
    ):
        store.create(name)
    assert len(store) == 0


def test_context_limit(manager: ModelManager, tmp_path: Path) -> None:
    store = store_for(manager, tmp_path, wheel_max_context_tokens=8)
    session = store.create("tiny-gpt2")
    with pytest.raises(ContextTooLongError, match="9 tokens; the limit is 8 \\(TZOO_WHEEL_MAX"):
        session.set_prompt("123456789")
    session.set_prompt("1234567")
    session.append(50, sampling=PLAIN, threshold=THRESHOLD)
    with pytest.raises(ContextTooLongError, match="TZOO_WHEEL_MAX_CONTEXT_TOKENS"):
        session.append(50, sampling=PLAIN, threshold=THRESHOLD)
    with pytest.raises(ContextTooLongError):
        session.append_other(sampling=PLAIN, threshold=0.5, seed=0)
    assert len(session.context_ids()) == 8
    session.undo()
    session.append(51, sampling=PLAIN, threshold=THRESHOLD)


# -- the store -------------------------------------------------------------------------------


def test_sessions_expire_after_the_idle_time(manager: ModelManager, tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_for(manager, tmp_path, clock=clock, wheel_session_ttl_seconds=60)
    kept, idle, also_idle = (store.create("tiny-gpt2") for _ in range(3))
    clock.advance(30)
    assert store.get(kept.id) is kept  # touched
    clock.advance(40)  # idle ones: 70 s; kept: 40 s
    with pytest.raises(SessionNotFoundError, match=f"No session {idle.id}; .* after 1 minute idle"):
        store.get(idle.id)
    assert len(store) == 2  # get removed the expired one
    assert store.cleanup() == 1  # also_idle
    assert store.cleanup() == 0
    assert store.get(kept.id) is kept
    with pytest.raises(SessionNotFoundError):
        store.get(also_idle.id)
    with pytest.raises(SessionNotFoundError, match="No session nope"):
        store.get("nope")


def test_idle_exactly_the_ttl_is_still_alive(manager: ModelManager, tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_for(manager, tmp_path, clock=clock)  # default: 3600 s
    session = store.create("tiny-gpt2")
    clock.advance(3600)
    assert store.get(session.id) is session
    clock.advance(3600.5)
    with pytest.raises(SessionNotFoundError, match="60 minutes idle"):
        store.get(session.id)


def test_cleanup_loop_sweeps_expired_sessions(manager: ModelManager, tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_for(
        manager,
        tmp_path,
        clock=clock,
        wheel_session_ttl_seconds=10,
        wheel_cleanup_interval_seconds=1,
    )
    store.create("tiny-gpt2")
    clock.advance(11)

    async def run() -> None:
        task = asyncio.create_task(store.run_cleanup_loop())
        for _ in range(40):
            await asyncio.sleep(0.05)
            if len(store) == 0:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    # Its own thread and loop: Playwright's sync API (browser tests in the same run) keeps
    # an event loop running on the main thread, where asyncio.run() is refused.
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _run_collecting(run, errors))
    worker.start()
    worker.join(timeout=30)
    assert not errors, errors
    assert len(store) == 0


def _run_collecting(
    make: Callable[[], Coroutine[Any, Any, None]], errors: list[BaseException]
) -> None:
    try:
        asyncio.run(make())
    except BaseException as exc:
        errors.append(exc)


def test_too_many_sessions(manager: ModelManager, tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_for(manager, tmp_path, clock=clock, wheel_max_sessions=2)
    first = store.create("tiny-gpt2")
    store.create("tiny-llama")
    with pytest.raises(TooManySessionsError, match=r"already 2 .*TZOO_WHEEL_MAX_SESSIONS"):
        store.create("tiny-gpt2")
    assert store.delete(first.id) is True
    assert store.delete(first.id) is False
    store.create("tiny-gpt2")
    clock.advance(3601)  # both idle past the ttl: creating drops them first
    store.create("tiny-gpt2")
    assert len(store) == 1


def test_snapshot_is_json_safe(manager: ModelManager, tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    store = store_for(manager, tmp_path, clock=clock)
    session = started(store, "tiny-llama", "Hi")
    session.append(72, sampling=Sampling(top_p=0.5), threshold=0.01)
    clock.advance(5)
    store.get(session.id)
    snap = json.loads(json.dumps(session.snapshot()))
    assert snap["id"] == session.id and snap["model_name"] == "tiny-llama"
    assert [t["text"] for t in snap["prompt_tokens"]] == ["<s>", "H", "i"]
    assert snap["text"] == "Hi" + session.steps[0].text
    assert snap["context_tokens"] == 4
    assert snap["steps"][0]["sampling"] == {"top_p": 0.5}
    assert snap["steps"][0]["choice"] == "token"
    assert snap["steps"][0]["wheel"]["other"]["count"] >= 0
    created = datetime.fromisoformat(snap["created_at"])
    assert created.utcoffset() is not None and created.timestamp() == 1_700_000_000.0
    expires = datetime.fromisoformat(snap["expires_at"]).timestamp()
    assert expires == 1_700_000_005.0 + 3600
    assert len(session.id) == 36


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_sessions_stay_isolated(store: SessionStore) -> None:
    sessions = [started(store, "tiny-llama", "Same start") for _ in range(4)]
    barrier = threading.Barrier(len(sessions))
    errors: list[BaseException] = []
    plans = [list(np.random.default_rng(i).integers(3, 259, size=15)) for i in range(4)]

    def work(session: WheelSession, plan: list[int]) -> None:
        try:
            barrier.wait()
            for k, token in enumerate(plan):
                session.append(int(token), sampling=PLAIN, threshold=THRESHOLD)
                if k % 5 == 4:
                    session.undo()
                    session.append(int(token), sampling=PLAIN, threshold=THRESHOLD)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=work, args=pair) for pair in zip(sessions, plans, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for session, plan in zip(sessions, plans, strict=True):
        assert session.context_ids() == session.prompt_ids + [int(t) for t in plan]
        np.testing.assert_allclose(
            session.distribution(PLAIN), session.full_recompute_distribution(PLAIN), atol=1e-5
        )


def test_requests_on_one_session_are_serialised(store: SessionStore) -> None:
    session = started(store, "tiny-gpt2")
    tokens = list(range(40, 60))

    def work(part: list[int]) -> None:
        for token in part:
            session.append(token, sampling=PLAIN, threshold=THRESHOLD)

    threads = [threading.Thread(target=work, args=(tokens[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(session.context_ids()[len(session.prompt_ids) :]) == tokens
    np.testing.assert_allclose(
        session.distribution(PLAIN), session.full_recompute_distribution(PLAIN), atol=1e-5
    )
