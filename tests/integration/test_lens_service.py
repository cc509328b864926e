"""The lens service end to end: REST, the WebSocket protocol, the queue (positions,
batching, cancel, interrupt, timeout, full), model groups, access control and the
monitoring endpoints, on the tiny models through a real app.

To make "running" and "queued" states deterministic, a test holds the model's lock: the
worker takes the first request (status running) and waits on the lock; later requests
queue behind it. Releasing the lock lets everything run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect
from tzoo_testing import make_settings

import tzoo
from tzoo.analyses.tuned_lens import TunedLens, default_lens_dir
from tzoo.service.model_groups import ModelGroupsFileError
from tzoo.web.app import create_app

TEXT = "The cat sat on the mat."
GROUP = "tiny-llama"


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Any]:
    """A factory of started apps (lifespan run) with settings overrides."""
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        overrides.setdefault("rate_limit_per_minute", 0)
        client = TestClient(create_app(make_settings(tmp_path, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Any) -> TestClient:
    return make_client()


def wait_for(client: TestClient, request_id: str, *, until: tuple[str, ...] = ()) -> dict[str, Any]:
    """Poll /status until the request is finished (or in one of ``until``)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = client.get(f"/status/{request_id}").json()
        if body["status"] in until or body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"request {request_id} did not finish: {body}")


def analyze(client: TestClient, text: str = TEXT, **fields: Any) -> dict[str, Any]:
    fields.setdefault("analysis", "logit_lens")
    fields.setdefault("model_group", GROUP)
    response = client.post("/analyze", json={"text": text, **fields})
    assert response.status_code == 202, response.text
    return response.json()


@contextmanager
def model_held(client: TestClient, model: str = GROUP) -> Iterator[None]:
    """Hold ``model``'s lock (loading it first) so that requests for it wait."""
    handle = client.app.state.manager.get(model)  # type: ignore[attr-defined]
    with handle.lock:
        yield


def receive_until(ws: WebSocketTestSession, kind: str, request_id: str | None = None) -> list[dict]:
    """Messages up to and including the first of type ``kind`` (for ``request_id``)."""
    seen = []
    while True:
        message = ws.receive_json()
        seen.append(message)
        if message["type"] == kind and request_id in (None, message.get("request_id")):
            return seen


# -- REST ----------------------------------------------------------------------------------


def test_logit_lens_over_rest_matches_the_direct_computation(client: TestClient) -> None:
    queued = analyze(client, options={"k": 3})
    assert queued["position"] == 1 and queued["status"] == "queued"
    body = wait_for(client, queued["request_id"])
    assert body["status"] == "completed", body
    assert body["position"] is None and body["progress"] == {
        "stage": "running",
        "done": 1,
        "total": 1,
    }
    result = body["result"]
    direct = tzoo.logit_lens(GROUP, TEXT, k=3)
    assert result["analysis"] == "logit_lens" and result["model_group"] == GROUP
    assert result["complete"] is True and result["tokens"] == direct.tokens
    assert result["top_ids"] == direct.top_ids.tolist()
    np.testing.assert_allclose(result["kl_to_final"], direct.kl_to_final, atol=1e-5)
    # The last layer is the model's own next-token distribution, straight from transformers.
    handle = client.app.state.manager.get(GROUP)  # type: ignore[attr-defined]
    with torch.no_grad():
        logits = handle.model(torch.tensor([direct.token_ids])).logits[0]
    top = torch.softmax(logits.float(), -1).topk(3, dim=-1)
    assert result["top_ids"][-1] == top.indices.tolist()
    np.testing.assert_allclose(result["top_probs"][-1], top.values.numpy(), atol=1e-5)


def test_status_of_an_unknown_request_is_404(client: TestClient) -> None:
    response = client.get("/status/not-a-request")
    assert response.status_code == 404
    assert "No request 'not-a-request'" in response.json()["detail"]


@pytest.mark.parametrize(
    ("payload", "status", "says"),
    [
        ({"text": "   "}, 422, "The text is empty"),
        ({"text": "x" * 60}, 413, "60 characters; the limit is 50"),
        (
            {"analysis": "attention"},
            422,
            "Input should be 'logit_lens', 'tuned_lens' or 'verbalize'",
        ),
        ({"model_group": "gpt-17"}, 404, "No model group named 'gpt-17'"),
        ({"options": {"k": 0}}, 422, "greater than or equal to 1"),
        ({"options": {"temperature": 2}}, 422, "Extra inputs are not permitted"),
        ({"analysis": "tuned_lens"}, 409, "tzoo lens train --model tiny-llama"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_message(
    make_client: Any, payload: dict[str, Any], status: int, says: str
) -> None:
    client = make_client(max_text_length=50)
    body = {"text": TEXT, "analysis": "logit_lens", "model_group": GROUP, **payload}
    response = client.post("/analyze", json=body)
    assert response.status_code == status, response.text
    assert says in json.dumps(response.json())


def test_a_bad_layer_fails_the_request_with_the_valid_range(client: TestClient) -> None:
    queued = analyze(client, analysis="verbalize", options={"layer": 99})
    body = wait_for(client, queued["request_id"])
    assert body["status"] == "failed"
    assert body["error"]["status"] == 422
    assert "layer" in body["error"]["message"] and "99" in body["error"]["message"]


def test_text_over_the_models_context_fails_with_413(make_client: Any) -> None:
    client = make_client()
    queued = analyze(client, text="word " * 3000)  # byte-level: 15000 tokens > 1024
    body = wait_for(client, queued["request_id"])
    assert body["status"] == "failed" and body["error"]["status"] == 413
    assert "tokens" in body["error"]["message"]


def test_queue_full_is_a_clear_503(make_client: Any) -> None:
    client = make_client(max_queue_size=2)
    with model_held(client):
        first = analyze(client)
        wait_for(client, first["request_id"], until=("running",))
        analyze(client)
        analyze(client)
        response = client.post(
            "/analyze", json={"text": TEXT, "analysis": "logit_lens", "model_group": GROUP}
        )
    assert response.status_code == 503
    assert response.json()["detail"].startswith("The queue is full (2 requests waiting)")
    assert int(response.headers["retry-after"]) > 0
    assert 'tzoo_lens_rejected_total{reason="queue_full"} 1.0' in client.get("/metrics").text


def test_rate_limit_answers_429_with_retry_after(make_client: Any) -> None:
    client = make_client(rate_limit_per_minute=3)
    for _ in range(3):
        analyze(client)
    response = client.post(
        "/analyze", json={"text": TEXT, "analysis": "logit_lens", "model_group": GROUP}
    )
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert "limit is 3 a minute" in response.json()["detail"]
    # Reading status is not rate limited (clients poll it).
    assert client.get("/api/v2/models").status_code == 200


def test_api_key_is_required_when_set(make_client: Any) -> None:
    client = make_client(api_key="sesame")
    body = {"text": TEXT, "analysis": "logit_lens", "model_group": GROUP}
    missing = client.post("/analyze", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "needs an API key" in missing.json()["detail"]
    wrong = client.post("/analyze", json=body, headers={"Authorization": "Bearer sesam"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "The API key is wrong."
    for path in ("/metrics", "/api/gpu_stats", "/api/v2/models", "/status/x"):
        assert client.get(path).status_code == 401, path
    right = client.post("/analyze", json=body, headers={"Authorization": "Bearer sesame"})
    assert right.status_code == 202
    assert client.get("/health").status_code == 200  # the rest of the site is not behind it


def test_cancel_and_interrupt_over_rest(client: TestClient) -> None:
    with model_held(client):
        running = analyze(client, analysis="verbalize")
        wait_for(client, running["request_id"], until=("running",))
        queued = analyze(client)
        cancelled = client.post(f"/cancel/{queued['request_id']}").json()
        assert cancelled["status"] == "cancelled"
        assert (
            client.post(f"/cancel/{running['request_id']}?keep_partial=true").json()["status"]
            == "running"
        )
    body = wait_for(client, running["request_id"])
    assert body["status"] == "interrupted"
    assert body["result"]["complete"] is False and body["result"]["rows"] == []


# -- the WebSocket -------------------------------------------------------------------------


def test_websocket_session_with_queue_updates_progress_completion_and_cancel(
    client: TestClient,
) -> None:
    with client.websocket_connect("/ws") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "connection_established"
        assert hello["analyses"] == ["logit_lens", "tuned_lens", "verbalize"]
        assert GROUP in [g["name"] for g in hello["model_groups"]]
        assert hello["api_key_required"] is False

        with model_held(client):
            ids = []
            for tag in ("a", "b", "c"):
                ws.send_json(
                    {
                        "type": "analyze",
                        "text": TEXT,
                        "analysis": "verbalize",
                        "model_group": GROUP,
                        "client_request_id": tag,
                    }
                )
                queued = receive_until(ws, "queued")[-1]
                assert queued["client_request_id"] == tag
                ids.append(queued["request_id"])
            # "a" went to the worker (running); "b" and "c" wait at 1 and 2.
            ws.send_json({"type": "status"})
            overview = receive_until(ws, "status")[-1]
            positions = {r["request_id"]: r["position"] for r in overview["requests"]}
            assert positions == {ids[0]: 0, ids[1]: 1, ids[2]: 2}
            ws.send_json({"type": "cancel_request", "request_id": ids[1]})
            seen = receive_until(ws, "queue_update", ids[2])
            assert any(m["type"] == "request_cancelled" and m["request_id"] == ids[1] for m in seen)
            assert seen[-1]["position"] == 1 and seen[-1]["queue_size"] == 1

        messages = receive_until(ws, "completed", ids[0])
        progress = [m for m in messages if m["type"] == "progress" and m["request_id"] == ids[0]]
        rows = [row for m in progress for row in m.get("rows", [])]
        result = messages[-1]["result"]
        assert messages[-1]["status"] == "completed" and result["complete"] is True
        assert len(result["rows"]) == len(result["tokens"]) == len(rows)
        assert rows == result["rows"]  # the streamed rows are the final ones
        assert progress[-1]["done"] == progress[-1]["total"] == len(rows)
        direct = tzoo.verbalize(GROUP, TEXT, layer=1)
        assert [r["explanation"] for r in result["rows"]] == [r.explanation for r in direct.rows]

        receive_until(ws, "completed", ids[2])
        ws.send_json({"type": "status", "request_id": ids[1]})
        assert receive_until(ws, "status")[-1]["status"] == "cancelled"


def test_websocket_interrupt_and_cancel_of_a_running_request(client: TestClient) -> None:
    """Both stop a running verbalisation: interrupt answers ``completed`` (status
    interrupted) with the partial result (no rows here: the stop came before the first
    batch); cancel answers ``request_cancelled`` (no result: it never got to compute)."""
    verbalize = {"type": "analyze", "text": TEXT, "analysis": "verbalize", "model_group": GROUP}
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        for stop, answer in (("interrupt", "completed"), ("cancel_request", "request_cancelled")):
            with model_held(client):
                ws.send_json(verbalize)
                request_id = receive_until(ws, "queued")[-1]["request_id"]
                receive_until(ws, "progress", request_id)  # taken by the worker: running
                ws.send_json({"type": stop, "request_id": request_id})
                # Messages are handled in order: once this answers, the stop is registered.
                ws.send_json({"type": "status", "request_id": request_id})
                assert receive_until(ws, "status")[-1]["status"] == "running"
            message = receive_until(ws, answer, request_id)[-1]
            if answer == "completed":
                assert message["status"] == "interrupted"
                assert message["result"]["complete"] is False and message["result"]["rows"] == []
                assert len(message["result"]["tokens"]) > 0
            else:
                assert message["result"] is None
        # A request that is not running any more: cancelling it changes nothing.
        ws.send_json({"type": "cancel_request", "request_id": request_id})
        ws.send_json({"type": "status", "request_id": request_id})
        assert receive_until(ws, "status")[-1]["status"] == "cancelled"


def test_disconnect_cancels_that_clients_requests(client: TestClient) -> None:
    queue = client.app.state.lens_queue  # type: ignore[attr-defined]
    with model_held(client):
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()
            ws.send_json(
                {"type": "analyze", "text": TEXT, "analysis": "logit_lens", "model_group": GROUP}
            )
            request_id = receive_until(ws, "queued")[-1]["request_id"]
            ws.send_json(
                {"type": "analyze", "text": TEXT, "analysis": "verbalize", "model_group": GROUP}
            )
            queued_id = receive_until(ws, "queued")[-1]["request_id"]
        deadline = time.monotonic() + 10
        while queue.get(queued_id).status.value != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.get(queued_id).status.value == "cancelled"
    # The socket's requests are its own (REST callers get a 404): ask the queue.
    while not queue.get(request_id).done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.get(request_id).status.value == "cancelled"


def test_websocket_errors_say_what_was_wrong(make_client: Any) -> None:
    client = make_client(rate_limit_per_minute=1, max_text_length=10)
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_text("{not json")
        assert ws.receive_json() == {
            "type": "error",
            "request_id": None,
            "error": "BadMessage",
            "message": 'Messages are JSON objects with a "type" field.',
            "status": 400,
        }
        ws.send_json({"type": "generate"})
        assert "Unknown message type 'generate'" in ws.receive_json()["message"]
        ws.send_json(
            {"type": "analyze", "text": "hi", "analysis": "nope", "client_request_id": "t1"}
        )
        error = ws.receive_json()
        assert error["status"] == 400 and error["message"].startswith("analysis: Input should be")
        assert error["request_id"] is None and error["client_request_id"] == "t1"
        ws.send_json(
            {
                "type": "analyze",
                "text": "far too long text",
                "analysis": "logit_lens",
                "model_group": GROUP,
            }
        )
        assert ws.receive_json()["status"] == 413
        ws.send_json(
            {"type": "analyze", "text": "hi", "analysis": "logit_lens", "model_group": GROUP}
        )
        limited = ws.receive_json()
        assert limited["status"] == 429 and limited["retry_after"] >= 1
        ws.send_json({"type": "cancel_request"})
        assert 'needs a "request_id"' in ws.receive_json()["message"]
        ws.send_json({"type": "cancel_request", "request_id": "someone-elses"})
        assert ws.receive_json()["status"] == 404


def test_websocket_api_key(make_client: Any) -> None:
    client = make_client(api_key="sesame")
    with client.websocket_connect("/ws") as ws:
        error = ws.receive_json()
        assert error["type"] == "error" and error["status"] == 401
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401
    with client.websocket_connect("/ws?api_key=sesame") as ws:
        assert ws.receive_json()["api_key_required"] is True
    with client.websocket_connect("/ws", headers={"Authorization": "Bearer sesame"}) as ws:
        assert ws.receive_json()["type"] == "connection_established"


def test_websocket_refuses_foreign_origins(make_client: Any) -> None:
    client = make_client(allowed_origins=["https://friend.example"])
    evil = {"Origin": "https://evil.example"}
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect("/ws", headers=evil) as ws,
    ):
        ws.receive_json()
    assert refused.value.code == 4403
    with client.websocket_connect("/ws", headers={"Origin": "https://friend.example"}) as ws:
        assert ws.receive_json()["type"] == "connection_established"
    preflight = client.options(
        "/analyze",
        headers={"Origin": "https://friend.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers["access-control-allow-origin"] == "https://friend.example"


# -- batching, timeouts ----------------------------------------------------------------------


@pytest.mark.parametrize("batching", [True, False])
def test_dynamic_batching_runs_queued_lens_requests_together(
    make_client: Any, batching: bool
) -> None:
    client = make_client(dynamic_batching=batching)
    texts = ["One fish.", "Two fish, red fish.", "Blue fish!", "A much longer sentence here."]
    with model_held(client):
        first = analyze(client, text="Warm up.")
        wait_for(client, first["request_id"], until=("running",))
        ids = [analyze(client, text=t)["request_id"] for t in texts]
        analyze(client, text="Other k", options={"k": 2})  # other options: not in the batch
    bodies = [wait_for(client, i) for i in ids]
    for text, body in zip(texts, bodies, strict=True):
        direct = tzoo.logit_lens(GROUP, text)
        assert body["result"]["top_ids"] == direct.top_ids.tolist()
        np.testing.assert_allclose(body["result"]["entropy"], direct.entropy, atol=1e-4)
    metrics = client.get("/metrics").text
    count = _metric(metrics, "tzoo_lens_batch_requests_count")
    assert count == (3 if batching else 6)  # warm-up, the four together, the k=2 one
    assert (
        _metric(metrics, 'tzoo_lens_requests_total{analysis="logit_lens",status="completed"}') == 6
    )


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_requests_time_out_in_the_queue_and_while_running(make_client: Any) -> None:
    client = make_client(request_timeout=0.3)
    with model_held(client):
        running = analyze(client, analysis="verbalize")
        wait_for(client, running["request_id"], until=("running",))
        queued = analyze(client)
        time.sleep(0.6)
        waited = client.get(f"/status/{queued['request_id']}").json()
        assert waited["status"] == "timed_out" and waited["error"]["status"] == 504
        assert "waited 0.3 s in the queue" in waited["error"]["message"]
    ran = wait_for(client, running["request_id"])
    assert ran["status"] == "timed_out" and ran["result"]["complete"] is False
    assert "ran past 0.3 s" in ran["error"]["message"]


# -- model groups ------------------------------------------------------------------------


def test_model_groups_list_switch_and_cpu_cache(make_client: Any) -> None:
    client = make_client(api_key="sesame")  # switching is the operator's
    client.headers["Authorization"] = "Bearer sesame"
    listing = client.get("/api/v2/models").json()
    assert listing["current_group"] == "smollm2-135m"  # the bundled file's default
    names = [g["name"] for g in listing["groups"]]
    assert names == ["smollm2-135m", "tiny-llama", "tiny-gpt2"]
    switched = client.post("/api/v2/models/switch", json={"model_group": "tiny-gpt2"}).json()
    assert switched["model_group"] == "tiny-gpt2"
    groups = {g["name"]: g for g in switched["groups"]}
    assert groups["tiny-gpt2"]["current"] and groups["tiny-gpt2"]["loaded"]
    assert groups["tiny-gpt2"]["n_layers"] == 2
    # A request without a group goes to the current one.
    body = wait_for(client, analyze(client, model_group=None)["request_id"])
    assert body["result"]["model"] == "tiny-gpt2"
    manager = client.app.state.manager  # type: ignore[attr-defined]
    client.post("/api/v2/models/switch", json={"model_group": "tiny-llama"})
    client.post("/api/v2/models/switch", json={"model_group": "tiny-gpt2"})
    assert manager.load_count["tiny-gpt2"] == 1  # switched out and back: not reloaded
    missing = client.post("/api/v2/models/switch", json={"model_group": "nope"})
    assert missing.status_code == 404 and missing.json()["known"] == names


def test_websocket_lists_and_switches_groups(make_client: Any) -> None:
    client = make_client(api_key="sesame")  # switching is the operator's
    with client.websocket_connect("/ws?api_key=sesame") as ws:
        ws.receive_json()
        ws.send_json({"type": "list_model_groups"})
        listing = ws.receive_json()
        assert listing["type"] == "model_groups" and listing["current_group"] == "smollm2-135m"
        ws.send_json({"type": "switch_model", "model_group": "tiny-llama"})
        done = receive_until(ws, "model_switch_complete")[-1]
        assert done["model_group"] == "tiny-llama" and done["elapsed_s"] >= 0
        ws.send_json({"type": "switch_model", "model_group": "nope"})
        error = receive_until(ws, "error")[-1]
        assert error["status"] == 404 and "No model group named 'nope'" in error["message"]


def write_groups(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "groups.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_groups_file_default_env_and_no_default(make_client: Any, tmp_path: Path) -> None:
    groups = [{"name": "small", "model": "tiny-gpt2"}, {"name": "llama", "model": "tiny-llama"}]
    path = write_groups(tmp_path, {"default_group": "small", "groups": groups})
    assert (
        make_client(model_groups_file=path).get("/api/v2/models").json()["current_group"] == "small"
    )
    chosen = make_client(model_groups_file=path, default_group="llama")
    assert chosen.get("/api/v2/models").json()["current_group"] == "llama"
    none = make_client(model_groups_file=write_groups(tmp_path, {"groups": groups}))
    response = none.post("/analyze", json={"text": TEXT, "analysis": "logit_lens"})
    assert response.status_code == 422
    assert "names no model_group and the server has no default group" in response.json()["detail"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{nope", "is not JSON"),
        ({"groups": []}, "groups: List should have at least 1 item"),
        ({"groups": [{"name": "a"}]}, "groups.0.model: Field required"),
        (
            {"default_group": "b", "groups": [{"name": "a", "model": "tiny-gpt2"}]},
            "default_group 'b'",
        ),
    ],
)
def test_a_malformed_groups_file_stops_the_start_with_the_fault(
    tmp_path: Path, content: object, says: str
) -> None:
    with pytest.raises(ModelGroupsFileError, match=r"groups\.json") as error:
        create_app(make_settings(tmp_path, model_groups_file=write_groups(tmp_path, content)))
    assert says in str(error.value)


def test_eager_loading_preloads_the_default_group(make_client: Any) -> None:
    client = make_client(lazy_load_model=False, default_group="tiny-gpt2")
    client.app.state.preloader.join(30)  # type: ignore[attr-defined]
    assert client.get("/ready").json()["models"] == {"tiny-gpt2": "ready"}


def test_tuned_lens_request_uses_the_groups_lens(make_client: Any, tmp_path: Path) -> None:
    client = make_client(tuned_lens_dir=tmp_path / "lenses")
    handle = client.app.state.manager.get(GROUP)  # type: ignore[attr-defined]
    lens = TunedLens(GROUP, handle.d_model, handle.config.num_hidden_layers)
    with torch.no_grad():
        lens.translators[0].bias.fill_(0.5)  # type: ignore[union-attr,operator]
    lens.save(default_lens_dir(GROUP, client.app.state.settings))  # type: ignore[attr-defined]
    body = wait_for(client, analyze(client, analysis="tuned_lens")["request_id"])
    assert body["status"] == "completed" and body["result"]["lens"] == "tuned"
    direct = tzoo.tuned_lens(GROUP, TEXT, lens=lens)
    np.testing.assert_allclose(body["result"]["kl_to_final"], direct.kl_to_final, atol=1e-5)
    assert body["result"]["kl_to_final"][0] != tzoo.logit_lens(GROUP, TEXT).kl_to_final[0].tolist()


# -- monitoring --------------------------------------------------------------------------


def test_gpu_stats_and_metrics(client: TestClient) -> None:
    wait_for(client, analyze(client)["request_id"])
    stats = client.get("/api/gpu_stats").json()
    assert stats["device"] == "cpu" and stats["gpus"] == []
    assert stats["cpu"]["count"] >= 1 and stats["memory"]["total_bytes"] > 0
    assert stats["models"]["loaded"] == [GROUP] and stats["queue"]["queue_size"] == 0
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert _metric(text, 'tzoo_lens_requests_total{analysis="logit_lens",status="completed"}') == 1
    assert _metric(text, "tzoo_models_loaded") == 1
    assert _metric(text, "tzoo_lens_queue_size") == 0
    assert _metric(text, 'tzoo_lens_request_seconds_count{analysis="logit_lens"}') == 1


def test_old_results_are_forgotten_past_the_memory_budget(client: TestClient) -> None:
    first = wait_for(client, analyze(client)["request_id"])
    size = len(json.dumps(first["result"]))
    settings = client.app.state.settings  # type: ignore[attr-defined]
    settings.job_results_max_mb = 1.5 * size / 2**20  # room for one result, not two
    second = wait_for(client, analyze(client, text="Another text.")["request_id"])
    assert client.get(f"/status/{first['request_id']}").status_code == 404
    assert client.get(f"/status/{second['request_id']}").json()["status"] == "completed"
