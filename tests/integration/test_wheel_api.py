"""The token wheel's REST API (the reference system's exact paths) on a tiny model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tzoo_testing import make_settings

from tzoo.runtime import tiny
from tzoo.web.app import create_app

PROMPT = "The cat sat on the"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    settings = make_settings(tmp_path, wheel_max_sessions=3, wheel_max_context_tokens=40)
    app = create_app(settings)
    with TestClient(app):
        yield app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def start(client: TestClient, prompt: str = PROMPT, model: str = "tiny-gpt2") -> str:
    created = client.post("/api/sessions", json={"model_name": model})
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    assert (
        client.post(f"/api/sessions/{session_id}/set-prompt", json={"prompt": prompt}).status_code
        == 200
    )
    return str(session_id)


def probs(client: TestClient, session_id: str, **params: object) -> dict:  # type: ignore[type-arg]
    response = client.get(
        f"/api/sessions/{session_id}/next-token-probs", params={"threshold": 0.01, **params}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def direct_probabilities(ids: list[int]) -> np.ndarray:
    model = tiny.build_model("gpt2")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), -1).numpy()


def test_session_ids_are_uuids_and_snapshots_describe_the_session(client: TestClient) -> None:
    session_id = start(client)
    assert uuid.UUID(session_id).version == 4
    snapshot = client.get(f"/api/sessions/{session_id}").json()
    assert snapshot["model_name"] == "tiny-gpt2" and snapshot["prompt"] == PROMPT
    assert "".join(t["text"] for t in snapshot["prompt_tokens"]) == PROMPT
    assert snapshot["steps"] == [] and snapshot["context_tokens"] == len(PROMPT)


def test_probabilities_equal_a_direct_softmax_and_the_wheel_adds_up(client: TestClient) -> None:
    session_id = start(client)
    wheel = probs(client, session_id)
    ids = [t["id"] for t in client.get(f"/api/sessions/{session_id}").json()["prompt_tokens"]]
    expected = direct_probabilities(ids)
    shown = [t["probability"] for t in wheel["tokens"]]
    assert shown == sorted(shown, reverse=True) and all(p >= 0.01 for p in shown)
    for token in wheel["tokens"]:
        assert token["probability"] == pytest.approx(expected[token["id"]], abs=1e-4)
    assert sum(shown) + wheel["other"]["probability"] == pytest.approx(1.0, abs=1e-6)
    assert wheel["other"]["count"] == int(((expected > 0) & (expected < 0.01)).sum())
    assert wheel["applied"] == {}


def test_sampling_controls_change_the_wheel_and_say_so(client: TestClient) -> None:
    session_id = start(client)
    wheel = probs(client, session_id, temperature=0.5, top_k=3, top_p=1.0)
    assert wheel["applied"] == {"temperature": 0.5, "top_k": 3}
    assert len(wheel["tokens"]) <= 3 and wheel["other"]["count"] == 3 - len(wheel["tokens"])


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"temperature": 0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_parameters_are_422_with_the_reason(
    client: TestClient, params: dict, phrase: str
) -> None:  # type: ignore[type-arg]
    session_id = start(client)
    response = client.get(f"/api/sessions/{session_id}/next-token-probs", params=params)
    assert response.status_code == 422 and phrase in response.text


def test_append_by_id_never_retokenises_and_undo_goes_back_to_the_prompt(
    client: TestClient,
) -> None:
    session_id = start(client)
    prompt_ids = [
        t["id"] for t in client.get(f"/api/sessions/{session_id}").json()["prompt_tokens"]
    ]
    # Two bytes of one UTF-8 character, appended one id at a time.
    tokenizer = tiny.build_tokenizer("gpt2")
    pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("é"))
    for token_id in pieces:
        body = client.post(
            f"/api/sessions/{session_id}/append-token", json={"token_id": token_id}
        ).json()
        assert body["step"]["token_id"] == token_id
    snapshot = body["session"]
    assert [s["token_id"] for s in snapshot["steps"]] == pieces
    assert snapshot["context_tokens"] == len(prompt_ids) + len(pieces)
    assert snapshot["text"] == PROMPT + "é"
    for _ in pieces:
        assert client.post(f"/api/sessions/{session_id}/undo").json()["undone"] is not None
    at_prompt = client.post(f"/api/sessions/{session_id}/undo").json()
    assert at_prompt["undone"] is None and at_prompt["session"]["steps"] == []


def test_other_is_sampled_on_the_server_and_a_seed_reproduces_it(client: TestClient) -> None:
    chosen = []
    for _ in range(2):
        session_id = start(client)
        below = {t["id"] for t in probs(client, session_id, threshold=0.2)["other"]["samples"]}
        step = client.post(
            f"/api/sessions/{session_id}/append-token",
            json={"choice": "other", "seed": 7, "threshold": 0.2},
        ).json()["step"]
        assert step["choice"] == "other" and step["probability"] < 0.2
        chosen.append(step["token_id"])
        client.delete(f"/api/sessions/{session_id}")
    assert chosen[0] == chosen[1]
    assert below  # the wedge lists sample tokens


def test_bad_appends_are_422(client: TestClient) -> None:
    session_id = start(client)
    assert (
        client.post(
            f"/api/sessions/{session_id}/append-token", json={"token_id": 10**6}
        ).status_code
        == 422
    )
    assert client.post(f"/api/sessions/{session_id}/append-token", json={}).status_code == 422
    assert (
        client.post(f"/api/sessions/{session_id}/append-token", json={"token_id": -1}).status_code
        == 422
    )


def test_unknown_expired_and_deleted_sessions_are_404(client: TestClient) -> None:
    assert client.get(f"/api/sessions/{uuid.uuid4()}").status_code == 404
    session_id = start(client)
    assert client.delete(f"/api/sessions/{session_id}").status_code == 204
    for response in (
        client.get(f"/api/sessions/{session_id}"),
        client.get(f"/api/sessions/{session_id}/next-token-probs"),
        client.post(f"/api/sessions/{session_id}/undo"),
        client.delete(f"/api/sessions/{session_id}"),
    ):
        assert response.status_code == 404 and "session" in response.json()["detail"].lower()


def test_limits_are_429_and_413(client: TestClient) -> None:
    sessions = [start(client) for _ in range(3)]
    response = client.post("/api/sessions", json={"model_name": "tiny-gpt2"})
    assert response.status_code == 429 and "sessions" in response.json()["detail"]
    client.delete(f"/api/sessions/{sessions[0]}")
    assert client.post("/api/sessions", json={"model_name": "tiny-gpt2"}).status_code == 201
    too_long = client.post(f"/api/sessions/{sessions[1]}/set-prompt", json={"prompt": "x" * 41})
    assert too_long.status_code == 413 and "40" in too_long.json()["detail"]


def test_encoders_and_unknown_models_are_refused(client: TestClient) -> None:
    encoder = client.post("/api/sessions", json={"model_name": "tiny-bert"})
    assert encoder.status_code == 422 and "decoder" in encoder.json()["detail"]
    unknown = client.post("/api/sessions", json={"model_name": "gpt-17"})
    assert unknown.status_code == 404 and "tiny-gpt2" in unknown.json()["known"]


def test_save_keeps_the_path_at_a_permanent_replay_link(client: TestClient) -> None:
    session_id = start(client)
    assert (
        client.post(f"/api/sessions/{session_id}/save", json={}).status_code == 422
    )  # nothing yet
    top = probs(client, session_id, threshold=0.002)["tokens"][0]
    client.post(
        f"/api/sessions/{session_id}/append-token", json={"token_id": top["id"], "threshold": 0.002}
    )
    client.post(f"/api/sessions/{session_id}/append-token", json={"choice": "other", "seed": 1})
    saved = client.post(f"/api/sessions/{session_id}/save", json={"visibility": "unlisted"})
    assert saved.status_code == 201
    slug = saved.json()["slug"]
    assert saved.json()["url"].endswith(f"/wheel/replay/{slug}")
    client.delete(f"/api/sessions/{session_id}")  # the replay outlives the session
    replay = client.get(f"/api/wheel-replays/{slug}").json()
    assert replay["prompt"] == PROMPT and [s["choice"] for s in replay["steps"]] == [
        "token",
        "other",
    ]
    assert replay["steps"][0]["token_id"] == top["id"] and replay["steps"][0]["wheel"]["tokens"]
    assert client.get(f"/wheel/replay/{slug}").status_code == 200
    assert client.get("/api/wheel-replays/nope").status_code == 404
    private = client.post(f"/api/sessions/{start(client)}/save", json={"visibility": "private"})
    assert private.status_code in (401, 422)


def test_the_wheel_page_lists_decoder_models_only(client: TestClient) -> None:
    page = client.get("/wheel")
    assert page.status_code == 200
    assert "tiny-gpt2" in page.text and "tiny-llama" in page.text
    assert 'value="tiny-bert"' not in page.text
