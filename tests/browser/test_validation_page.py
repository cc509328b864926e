"""The validation page (/validate) in a real browser: a catalogue model queued, its progress
shown, the report opened at its permanent link; uploads refused by default; a hostile model
name stays inert on the report page."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tzoo_testing import run_server

pytestmark = pytest.mark.browser

XSS = "<img src=x onerror=window.__pwned=1>"
MODEL_PY = textwrap.dedent(
    """
    from torch import nn


    class Bigram(nn.Module):
        def __init__(self, vocab_size: int = 50, d_model: int = 16) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, d_model)
            self.out = nn.Linear(d_model, vocab_size)

        def forward(self, input_ids):
            return self.out(self.embed(input_ids))
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that takes model.py uploads (the operator allowed them)."""
    root = tmp_path_factory.mktemp("validation-server")
    with run_server(root, {"TZOO_VALIDATION_UPLOADS": "true"}) as url:
        yield url


def assert_local(page: Any, server: str) -> None:
    """No injected script ran and nothing left the host."""
    assert page.evaluate("window.__pwned") is None
    for url in page.requests:
        assert url.startswith(server) or url.split(":", 1)[0] in {"data", "blob"}, url


def test_a_catalogue_model_is_validated_and_its_report_opens(page: Any, server: str) -> None:
    page.goto(f"{server}/validate")
    page.select_option("#val-model", "tiny-gpt2")
    page.uncheck("input[name=tier][value='2']")
    page.click("#val-submit")
    page.wait_for_selector("#val-job:not([hidden])")
    page.wait_for_url(re.compile(r"/validations/\w+$"), timeout=240_000)
    assert page.locator("h1").text_content() == "Validation of tiny-gpt2"
    slug = page.url.rsplit("/", 1)[1]
    report = httpx.get(f"{server}/api/validations/{slug}").json()
    rows = page.locator("#val-results tbody tr")
    assert rows.count() == len(report["results"]) >= 10
    for result in report["results"]:
        row = page.locator(f'#val-results tr[data-check="{result["name"]}"]')
        assert row.get_attribute("data-status") == result["status"]
        assert row.locator(".val-status").text_content() == result["status"]
    assert {r["tier"] for r in report["results"]} == {1}
    assert_local(page, server)


def test_an_upload_runs_and_a_hostile_name_stays_inert(
    page: Any, server: str, tmp_path: Path
) -> None:
    model = tmp_path / "model.py"
    model.write_text(MODEL_PY)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"name": XSS, "vocab_size": 50, "max_length": 16}))
    page.goto(f"{server}/validate")
    page.select_option("#val-model", "")
    page.set_input_files("#val-file", str(model))
    page.set_input_files("#val-config", str(config))
    page.uncheck("input[name=tier][value='2']")
    page.click("#val-submit")
    page.wait_for_url(re.compile(r"/validations/\w+$"), timeout=240_000)
    assert page.locator("h1").text_content() == f"Validation of {XSS}"
    assert_local(page, server)


def test_a_bad_request_shows_the_server_s_sentence(page: Any, server: str) -> None:
    page.goto(f"{server}/validate")
    for tier in ("1", "2"):
        page.uncheck(f"input[name=tier][value='{tier}']")
    page.click("#val-submit")
    assert page.locator("#val-error").text_content() == "Choose at least one tier."
    page.check("input[name=tier][value='1']")
    page.select_option("#val-model", "")
    page.click("#val-submit")
    assert (
        "Choose a catalogue model or a model.py file." in page.locator("#val-error").text_content()
    )
