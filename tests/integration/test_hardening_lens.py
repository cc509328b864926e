"""The lens service under attack (issue 12): switching the default group is the operator's
(REST and WebSocket), a request's status and cancel are its sender's, a deeply nested or
oversized WebSocket message gets an error reply and the connection stays, and request
bodies are strict about integers and booleans."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from tzoo_testing import make_settings, signed_up

from tzoo.store.accounts import create_api_token, create_user, get_user
from tzoo.web.app import create_app
from tzoo.web.deps import ADMIN_REQUIRED

TEXT = "The cat sat on the mat."
GROUP = "tiny-llama"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(make_settings(tmp_path, rate_limit_per_minute=0))
    with TestClient(app):  # the lifespan: migrations, the lens queue
        yield app


def admin_token(app: FastAPI) -> dict[str, str]:
    """An admin account's API token, as a header."""
    with app.state.session_factory() as session:
        create_user(session, username="root", password_hash="x", is_admin=True)
        root = get_user(session, "root")
        assert root is not None
        _, token = create_api_token(session, root, "ops")
    return {"Authorization": f"Bearer {token}"}


def receive_until(ws: WebSocketTestSession, kind: str) -> dict[str, Any]:
    while True:
        message = ws.receive_json()
        if message["type"] == kind:
            return message


@contextmanager
def model_held(app: FastAPI, model: str = GROUP) -> Iterator[None]:
    """Hold the model's lock so that requests for it stay queued or running."""
    handle = app.state.manager.get(model)
    with handle.lock:
        yield


def analyze(client: TestClient, **headers: str) -> str:
    body = {"text": TEXT, "analysis": "logit_lens", "model_group": GROUP}
    answer = client.post("/analyze", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["request_id"])


# -- switching groups ------------------------------------------------------------------------


@pytest.mark.usefixtures("cheap_passwords")
def test_only_the_operator_switches_the_default_group_over_rest(app: FastAPI) -> None:
    groups = app.state.model_groups
    before = groups.current
    anonymous, browser = TestClient(app), TestClient(app)
    # The attack: anyone changed the default group for everyone.
    answer = anonymous.post("/api/v2/models/switch", json={"model_group": "tiny-gpt2"})
    assert answer.status_code == 401 and answer.json()["detail"] == ADMIN_REQUIRED
    csrf = signed_up(browser, "mallory")
    answer = browser.post(
        "/api/v2/models/switch", json={"model_group": "tiny-gpt2"}, headers={"X-CSRF-Token": csrf}
    )
    assert answer.status_code == 403 and answer.json()["detail"] == ADMIN_REQUIRED
    assert groups.current == before and not app.state.manager.is_loaded("tiny-gpt2")

    answer = anonymous.post(
        "/api/v2/models/switch", json={"model_group": "tiny-gpt2"}, headers=admin_token(app)
    )
    assert answer.status_code == 200, answer.text
    assert groups.current == "tiny-gpt2"


@pytest.mark.usefixtures("cheap_passwords")
def test_only_the_operator_switches_over_the_websocket(app: FastAPI) -> None:
    groups = app.state.model_groups
    before = groups.current
    with TestClient(app).websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_json({"type": "switch_model", "model_group": "tiny-gpt2"})
        error = receive_until(ws, "error")
        assert error["status"] == 403 and error["message"] == ADMIN_REQUIRED
        assert groups.current == before
        ws.send_json({"type": "list_model_groups"})  # the connection goes on
        assert receive_until(ws, "model_groups")["current_group"] == before

    # An admin's browser: the session cookie goes with the WebSocket.
    browser = TestClient(app)
    signed_up(browser, "root")
    with app.state.session_factory() as session:
        root = get_user(session, "root")
        assert root is not None
        root.is_admin = True
        session.commit()
    with browser.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_json({"type": "switch_model", "model_group": "tiny-gpt2"})
        assert receive_until(ws, "model_switch_complete")["model_group"] == "tiny-gpt2"
        # The role is read for each switch: revoked, the next one is refused.
        with app.state.session_factory() as session:
            root = get_user(session, "root")
            assert root is not None
            root.is_admin = False
            session.commit()
        ws.send_json({"type": "switch_model", "model_group": "tiny-llama"})
        assert receive_until(ws, "error")["status"] == 403
    assert groups.current == "tiny-gpt2"


# -- whose request is it ---------------------------------------------------------------------


@pytest.mark.usefixtures("cheap_passwords")
def test_status_and_cancel_are_the_senders_only(app: FastAPI) -> None:
    alice, bob, anonymous = TestClient(app), TestClient(app), TestClient(app)
    signed_up(alice, "alice")
    signed_up(bob, "bob")
    queue = app.state.lens_queue
    with model_held(app):
        request_id = analyze(alice)
        unknown = anonymous.get("/status/no-such-request")
        assert unknown.status_code == 404
        for other in (bob, anonymous):
            # The attack: read or cancel someone else's request by its id.
            seen = other.get(f"/status/{request_id}")
            cancelled = other.post(f"/cancel/{request_id}")
            for answer in (seen, cancelled):
                assert answer.status_code == 404
                assert answer.json() == {
                    k: v.replace("no-such-request", request_id) if isinstance(v, str) else v
                    for k, v in unknown.json().items()
                }
        assert not queue.get(request_id).done
        assert alice.get(f"/status/{request_id}").json()["status"] in ("queued", "running")
        # The operator may read and act on any request.
        operator = admin_token(app)
        assert anonymous.get(f"/status/{request_id}", headers=operator).status_code == 200
        assert alice.post(f"/cancel/{request_id}").json()["request_id"] == request_id

    # An anonymous REST caller's requests are its address's: another address gets a 404.
    mine = analyze(anonymous)
    assert anonymous.get(f"/status/{mine}").status_code == 200
    elsewhere = TestClient(app, client=("203.0.113.9", 50000))
    assert elsewhere.get(f"/status/{mine}").status_code == 404


def test_websocket_requests_are_their_connections(app: FastAPI) -> None:
    client = TestClient(app)
    queue = app.state.lens_queue
    with model_held(app), client.websocket_connect("/ws") as first:
        first.receive_json()
        first.send_json(
            {"type": "analyze", "text": TEXT, "analysis": "logit_lens", "model_group": GROUP}
        )
        request_id = receive_until(first, "queued")["request_id"]
        with client.websocket_connect("/ws") as second:
            second.receive_json()
            for kind in ("cancel_request", "interrupt", "status"):
                second.send_json({"type": kind, "request_id": request_id})
                error = receive_until(second, "error")
                assert error["status"] == 404, error
        # Nor over REST, from the same address: the socket's requests are the socket's.
        assert client.get(f"/status/{request_id}").status_code == 404
        assert client.post(f"/cancel/{request_id}").status_code == 404
        assert not queue.get(request_id).done
        first.send_json({"type": "cancel_request", "request_id": request_id})
        assert receive_until(first, "request_cancelled")["request_id"] == request_id


# -- WebSocket messages: size and depth ------------------------------------------------------


def test_deeply_nested_and_oversized_messages_get_an_error_and_the_socket_stays(
    app: FastAPI,
) -> None:
    settings = app.state.settings
    with TestClient(app).websocket_connect("/ws") as ws:
        ws.receive_json()
        # The attack: 200 KB of [[[[...]]]] made json.loads recurse until RecursionError,
        # and the connection dropped.
        ws.send_text("[" * 100_000 + "]" * 100_000)
        error = receive_until(ws, "error")
        assert error["status"] == 413 and error["error"] == "MessageTooLarge"
        assert "TZOO_WS_MAX_MESSAGE_BYTES" in error["message"]

        # Under the size limit but far deeper than any message needs (json.loads alone
        # would raise RecursionError here).
        ws.send_text("[" * 20_000 + "]" * 20_000)
        error = receive_until(ws, "error")
        assert error["status"] == 400 and "TZOO_JSON_MAX_DEPTH" in error["message"]

        # Deep inside a message that is otherwise fine.
        depth = settings.json_max_depth + 1
        nested = "[" * depth + "1" + "]" * depth
        ws.send_text(
            '{"type": "analyze", "text": "x", "analysis": "verbalize", '
            f'"options": {{"positions": {nested}}}}}'
        )
        assert receive_until(ws, "error")["status"] == 400

        # Brackets inside strings are text, not nesting.
        ws.send_text('{"type": "list_model_groups", "note": "' + "[" * 1000 + '"}')
        assert receive_until(ws, "model_groups")["groups"]

        # The connection still works.
        ws.send_json({"type": "list_model_groups"})
        assert receive_until(ws, "model_groups")["current_group"]


# -- strict types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"options": {"k": True}},
        {"options": {"layer": True}, "analysis": "verbalize"},
        {"options": {"positions": [False, True]}, "analysis": "verbalize"},
        {"options": {"k": "3"}},
        {"unknown_field": 1},
    ],
)
def test_analyze_refuses_booleans_for_integers_and_unknown_fields(
    app: FastAPI, body: dict[str, Any]
) -> None:
    full = {"text": TEXT, "analysis": "logit_lens", "model_group": GROUP, **body}
    answer = TestClient(app).post("/analyze", json=full)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "ValidationError"


def test_switch_refuses_unknown_fields(app: FastAPI) -> None:
    answer = TestClient(app).post(
        "/api/v2/models/switch",
        json={"model_group": "tiny-gpt2", "force": True},
        headers=admin_token(app),
    )
    assert answer.status_code == 422
    assert app.state.model_groups.current != "tiny-gpt2"
