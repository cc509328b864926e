"""The OpenAI-compatible explainer against a real HTTP server on 127.0.0.1.

No real endpoint (OpenAI or any other) is reachable from the build and CI machines, so
these tests start a small server in a thread that implements ``POST
/v1/chat/completions`` with deterministic answers: the request's ``model`` picks the
behaviour ("labeller" answers like a helpful model: a label for explanation prompts and,
for detection prompts, 1 for each text with a comma; "fail" answers HTTP 500; "slow"
answers after the client's timeout; "garbage" answers text that is not JSON; "empty"
answers JSON without choices). It checks the Bearer key and records every request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from tzoo.circuits.features import FeatureContext, FeatureDashboard, Histogram
from tzoo.circuits.labels import (
    DETECT_SYSTEM,
    EXPLAIN_SYSTEM,
    ExplainerHTTPError,
    ExplainerResponseError,
    ExplainerTimeoutError,
    ExplainerUnreachableError,
    OpenAICompatibleExplainer,
    explain_feature,
    score_detection,
)

KEY = "sk-test-123"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
SLOW_S = 1.5


class ChatHandler(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []  # each server's subclass has its own

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path != "/v1/chat/completions":
            return self.reply(404, b'{"error": "no such route"}')
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.reply(401, b'{"error": {"message": "bad key"}}')
        model = body["model"]
        if model == "fail":
            return self.reply(500, b'{"error": {"message": "the model crashed"}}')
        if model == "slow":
            time.sleep(SLOW_S)
        if model == "garbage":
            return self.reply(200, b"<html>Bad gateway</html>")
        if model == "empty":
            return self.reply(200, b'{"object": "chat.completion", "choices": []}')
        content = answer(body["messages"][0]["content"], body["messages"][-1]["content"])
        completion = {
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        }
        return self.reply(200, json.dumps(completion).encode())

    def reply(self, status: int, payload: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the "slow" case: the client gave up before the answer


def answer(system: str, user: str) -> str:
    if system == EXPLAIN_SYSTEM:
        return "Label: commas after a word."
    if system == DETECT_SYSTEM:
        lines = user.split("Texts:\n", 1)[1].split("\n\n")[0].splitlines()
        return str([int("," in line.split(". ", 1)[1]) for line in lines])
    return "?"


@pytest.fixture
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(base URL ending in /v1, the requests it received)."""

    class Handler(ChatHandler):
        requests: ClassVar[list[dict[str, Any]]] = []

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", Handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def dashboard() -> FeatureDashboard:
    top = [
        FeatureContext(0, 1, 1, ["Hello", ",", " world"], [1, 2, 3], [0.0, 2.0, 0.0]),
        FeatureContext(1, 1, 1, ["Yes", ",", " sir"], [4, 2, 5], [0.0, 1.0, 0.0]),
    ]
    return FeatureDashboard(
        model_name="test",
        layer=0,
        feature=1,
        n_tokens=10,
        n_active=2,
        frequency=0.2,
        max_activation=2.0,
        mean_activation=1.5,
        top_contexts=top,
        quantiles=[],
        top_logits=[],
        bottom_logits=[],
        histogram=Histogram([0.0, 2.0], [2]),
        logits_layer=0,
    )


def heldout() -> list[FeatureContext]:
    firing = [
        FeatureContext(i, 1, 1, ["A", ",", " b"], [1, 2, 3], [0.0, 1.0, 0.0]) for i in range(4)
    ]
    silent = [FeatureContext(9 + i, 0, 0, ["A b c"], [7], [0.0]) for i in range(3)]
    return firing + silent


def test_labels_and_scores_through_the_endpoint(server: tuple[str, list[Any]]) -> None:
    url, requests = server
    with OpenAICompatibleExplainer(url, KEY, "labeller", timeout=5) as explainer:
        label = explain_feature(dashboard(), explainer)
        score = score_detection(label, dashboard(), heldout(), explainer, contexts_per_prompt=3)
    assert label == "commas after a word"
    assert (score.balanced_accuracy, score.precision, score.recall) == (1.0, 1.0, 1.0)
    assert score.explainer == f"labeller at {url}"
    assert len(requests) == 1 + 3  # one explanation, three detection prompts (3 + 3 + 1)
    first = requests[0]
    assert first["headers"]["Authorization"] == f"Bearer {KEY}"
    body = first["body"]
    assert body["model"] == "labeller" and body["temperature"] == 0 and body["max_tokens"] == 32
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert "Hello<<,>> world" in body["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("model", "error", "message"),
    [
        ("fail", ExplainerHTTPError, "answered HTTP 500: .*the model crashed"),
        ("garbage", ExplainerResponseError, "not JSON: .*Bad gateway"),
        ("empty", ExplainerResponseError, r"without choices\[0\].message.content"),
        ("slow", ExplainerTimeoutError, "did not answer within 0.3 s"),
    ],
)
def test_endpoint_errors(
    server: tuple[str, list[Any]], model: str, error: type[Exception], message: str
) -> None:
    url, _ = server
    with (
        OpenAICompatibleExplainer(url, KEY, model, timeout=0.3) as explainer,
        pytest.raises(error, match=message) as caught,
    ):
        explainer.complete(CHAT, max_tokens=5)
    assert KEY not in str(caught.value)
    if isinstance(caught.value, ExplainerHTTPError):
        assert caught.value.status_code == 500


def test_wrong_key_and_wrong_path(server: tuple[str, list[Any]]) -> None:
    url, _ = server
    with (
        OpenAICompatibleExplainer(url, "sk-wrong", "labeller") as explainer,
        pytest.raises(ExplainerHTTPError, match="HTTP 401") as caught,
    ):
        explainer.complete(CHAT, max_tokens=5)
    assert caught.value.status_code == 401 and "sk-wrong" not in str(caught.value)
    base = url.removesuffix("/v1")
    with (
        OpenAICompatibleExplainer(base, KEY, "labeller") as explainer,
        pytest.raises(ExplainerHTTPError, match="HTTP 404"),
    ):
        explainer.complete(CHAT, max_tokens=5)


def test_connection_refused() -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with (
        OpenAICompatibleExplainer(url, KEY, "labeller", timeout=5) as explainer,
        pytest.raises(ExplainerUnreachableError, match=f"Cannot reach .*{port}") as caught,
    ):
        explainer.complete(CHAT, max_tokens=5)
    assert "TZOO_AUTOINTERP_URL" in str(caught.value) and KEY not in str(caught.value)
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleExplainer("127.0.0.1:9", None, "m")
