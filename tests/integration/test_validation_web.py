"""The validation suite over the web: a queued run in a worker process, its progress, the
stored report at its permanent link, uploads (off unless allowed), and every refusal."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tzoo_testing import META_TOKEN, make_settings, signed_up

from tzoo.validation import validate
from tzoo.web.app import create_app

CHECKS = "determinism,shape_sweep"  # quick tier-1 checks: a run takes seconds
MODEL_PY = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Bigram(nn.Module):
        """A bigram language model: logits from the current token only (causal)."""

        def __init__(self, vocab_size: int = 50, d_model: int = 16) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, d_model)
            self.out = nn.Linear(d_model, vocab_size)

        def forward(self, input_ids):
            return self.out(self.embed(input_ids))
    '''
)
CONFIG = {"name": "bigram", "vocab_size": 50, "d_model": 16, "max_length": 64}


def make_app(root: Path, **overrides: Any) -> FastAPI:
    return create_app(make_settings(root, **overrides))


@pytest.fixture(scope="module")
def uploads_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    app = make_app(
        tmp_path_factory.mktemp("validation-web"),
        validation_uploads=True,
        validation_timeout=20,
        validation_max_upload_kb=4,
    )
    with TestClient(app):
        yield app


@pytest.fixture
def client(uploads_app: FastAPI) -> TestClient:
    """An anonymous browser: multipart forms carry the page's signed CSRF nonce."""
    browser = TestClient(uploads_app)
    match = META_TOKEN.search(browser.get("/validate").text)
    assert match, "no csrf-token meta tag on /validate"
    browser.headers["X-CSRF-Token"] = match.group(1)
    return browser


def wait(client: TestClient, location: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        status = client.get(location).json()
        seen.append(status["state"])
        if status["state"] in ("done", "failed"):
            status["seen"] = seen
            return status
        time.sleep(0.2)
    raise AssertionError(f"the job did not finish in {timeout} s: {seen[-5:]}")


def upload(
    client: TestClient, code: str, config: dict[str, Any] | None = CONFIG, **form: str
) -> Any:
    files: dict[str, Any] = {"model_file": ("model.py", code.encode(), "text/x-python")}
    if config is not None:
        files["config_file"] = ("config.json", json.dumps(config).encode(), "application/json")
    return client.post(
        "/api/validations", data={"tiers": "1", "checks": CHECKS, **form}, files=files
    )


def test_a_catalogue_model_is_validated_and_its_report_kept(client: TestClient) -> None:
    response = client.post(
        "/api/validations", data={"model_name": "tiny-gpt2", "tiers": "1", "checks": CHECKS}
    )
    assert response.status_code == 202, response.text
    assert response.json()["state"] in ("queued", "running")
    status = wait(client, response.headers["location"])
    assert status["state"] == "done", status
    assert status["passed"] is True and status["total"] == 2
    slug = status["slug"]
    assert status["url"] == f"/validations/{slug}"
    report = client.get(f"/api/validations/{slug}").json()
    assert [r["name"] for r in report["results"]] == ["shape_sweep", "determinism"] or [
        r["name"] for r in report["results"]
    ] == ["determinism", "shape_sweep"]
    assert report["model"] == "tiny-gpt2" and report["environment"]["kind"] == "decoder"
    # The same checks run in this process give the same statuses.
    direct = validate("tiny-gpt2", None, (1,), checks=CHECKS.split(","))
    assert {r.name: r.status for r in direct.results} == {
        r["name"]: r["status"] for r in report["results"]
    }
    page = client.get(f"/validations/{slug}")
    assert page.status_code == 200 and 'data-check="determinism"' in page.text
    assert "no check failed" in page.text
    markdown = client.get(f"/api/validations/{slug}", params={"format": "markdown"})
    assert markdown.text.startswith("# Validation of tiny-gpt2")
    html_report = client.get(f"/api/validations/{slug}", params={"format": "html"})
    assert "<table>" in html_report.text and "<style>" in html_report.text
    # Its inline styles are allowed by a policy of its own; scripts are not.
    policy = html_report.headers["content-security-policy"]
    assert "style-src 'unsafe-inline'" in policy and "script-src" not in policy
    assert "default-src 'none'" in policy
    assert slug in client.get("/validate").text  # listed among the recent reports


def test_an_uploaded_model_runs_in_the_worker(client: TestClient) -> None:
    response = upload(client, MODEL_PY)
    assert response.status_code == 202, response.text
    status = wait(client, response.headers["location"])
    assert status["state"] == "done", status
    report = client.get(f"/api/validations/{status['slug']}").json()
    assert report["model"] == "bigram" and report["environment"]["vocab_size"] == 50


def test_broken_uploads_fail_with_their_reason(client: TestClient) -> None:
    crashing = upload(client, "raise RuntimeError('no model here')\n")
    status = wait(client, crashing.headers["location"])
    assert status["state"] == "failed" and status["error"]["status"] == 422
    assert "no model here" in status["error"]["detail"]
    exiting = upload(client, "import os\nos._exit(7)\n")
    status = wait(client, exiting.headers["location"])
    assert status["state"] == "failed" and "exit code 7" in status["error"]["detail"]


def test_a_hanging_model_is_stopped_at_the_timeout(client: TestClient) -> None:
    hanging = MODEL_PY.replace(
        "super().__init__()", "super().__init__()\n        import time; time.sleep(600)"
    )
    started = time.monotonic()
    status = wait(client, upload(client, hanging).headers["location"], timeout=120)
    assert status["state"] == "failed" and status["error"]["status"] == 504
    assert "TZOO_VALIDATION_TIMEOUT" in status["error"]["detail"]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("form", "files", "status", "detail"),
    [
        ({"model_name": "gpt-17"}, None, 404, "gpt-17"),
        ({"model_name": "tiny-gpt2", "tiers": "5"}, None, 422, "tiers are 1, 2, 3 and 4"),
        ({"model_name": "tiny-gpt2", "tiers": "x"}, None, 422, "Bad tiers"),
        ({"model_name": "tiny-gpt2", "checks": "nope"}, None, 422, "No check named nope"),
        ({}, None, 422, "Give either a catalogue model or a model.py"),
        ({"model_name": "tiny-gpt2", "visibility": "private"}, None, 401, "Log in"),
        ({}, {"model_file": ("model.py", b"x" * 5000, "text/x-python")}, 413, "larger than 4 KiB"),
        (
            {},
            {
                "model_file": ("m.py", b"x=1", "text/x-python"),
                "config_file": ("c.json", b"[1]", "application/json"),
            },
            422,
            "JSON object",
        ),
        (
            {},
            {
                "model_file": ("m.py", b"x=1", "text/x-python"),
                "config_file": ("c.json", b"{", "application/json"),
            },
            422,
            "not JSON",
        ),
    ],
)
def test_bad_requests_get_clear_errors(
    client: TestClient, form: dict[str, str], files: Any, status: int, detail: str
) -> None:
    response = client.post("/api/validations", data={"tiers": "1", **form}, files=files)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


def test_uploads_are_refused_unless_the_operator_allows_them(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with TestClient(app) as client:
        match = META_TOKEN.search(client.get("/validate").text)
        assert match
        client.headers["X-CSRF-Token"] = match.group(1)
        response = upload(client, MODEL_PY)
        assert response.status_code == 403
        assert "TZOO_VALIDATION_UPLOADS" in response.json()["detail"]
        page = client.get("/validate").text
        assert 'id="val-uploads-off"' in page and 'name="model_file"' not in page


def test_unknown_reports_and_jobs_are_404(client: TestClient) -> None:
    assert client.get("/api/validations/nope").status_code == 404
    assert client.get("/validations/nope").status_code == 404
    assert client.get("/api/validations/jobs/nope").status_code == 404


def test_a_private_report_is_only_its_owner_s(uploads_app: FastAPI) -> None:
    ada, bob = TestClient(uploads_app), TestClient(uploads_app)
    csrf = signed_up(ada, "ada-validates")
    signed_up(bob, "bob-validates")
    response = ada.post(
        "/api/validations",
        data={
            "model_name": "tiny-gpt2",
            "tiers": "1",
            "checks": "determinism",
            "visibility": "private",
        },
        headers={"X-CSRF-Token": csrf},
    )
    assert response.status_code == 202, response.text
    status = wait(ada, response.headers["location"])
    slug = status["slug"]
    assert ada.get(f"/api/validations/{slug}").status_code == 200
    assert bob.get(f"/api/validations/{slug}").status_code == 404
    assert TestClient(uploads_app).get(f"/validations/{slug}").status_code == 404
    refused = ada.post("/api/validations", data={"model_name": "tiny-gpt2", "tiers": "1"})
    assert refused.status_code == 403  # a logged-in write without the CSRF token
    anonymous = TestClient(uploads_app).post(
        "/api/validations", data={"model_name": "tiny-gpt2", "tiers": "1"}
    )
    assert anonymous.status_code == 403  # a form without the page's nonce (cross-site)
