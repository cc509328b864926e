"""The home page in a real browser: tools and models listed, load/unload (the operator's),
theme, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

OPERATOR, PASSWORD = "operator", "operator password 1"


def log_in_as_operator(page, live_server: str, root: Path) -> None:  # type: ignore[no-untyped-def]
    """Make the live server's operator account (once; the CLI is the only way) and log in."""
    env = {**os.environ, "TZOO_DATA_DIR": str(root / "data"), "TZOO_CACHE_DIR": str(root / "cache")}
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "tzoo.cli",
            "users",
            "create",
            OPERATOR,
            "--admin",
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0 or "taken" in made.stdout + made.stderr, made.stdout + made.stderr
    page.goto(live_server + "/login")
    page.fill("#username", OPERATOR)
    page.fill("#password", PASSWORD)
    page.locator("form").filter(has=page.locator("#password")).locator("[type=submit]").click()
    page.wait_for_url(live_server + "/")


def test_home_lists_tools_and_models_and_loads_offline(live_server: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(live_server + "/")
    assert page.title() == "Transformer Zoo"
    tools = page.locator("#tools .card h3").all_inner_texts()
    assert "Attention explorer" in tools and "Token wheel" in tools
    models = page.locator("#models tbody tr").evaluate_all("rows => rows.map(r => r.dataset.model)")
    assert {"smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-t5"} <= set(models)
    # Every request the page made went to our own server.
    assert page.requests and all(url.startswith(live_server) for url in page.requests)


def test_only_the_operator_gets_load_buttons(live_server: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(live_server + "/")
    assert page.locator('tr[data-model="tiny-gpt2"]').count() == 1
    assert page.locator(".model-action").count() == 0
    refused = page.request.post(live_server + "/api/models/tiny-gpt2/load")
    assert refused.status == 401


def test_load_and_unload_a_model_from_the_table(
    live_server: str, live_server_root: Path, page
) -> None:  # type: ignore[no-untyped-def]
    log_in_as_operator(page, live_server, live_server_root)
    # The live server is shared by the session: start from a known state.
    page.goto(live_server + "/")
    row = page.locator('tr[data-model="tiny-gpt2"]')
    if row.get_by_role("button", name="Unload", exact=True).count():
        row.get_by_role("button", name="Unload", exact=True).click()
        page.wait_for_function(
            "document.querySelector('tr[data-model=\"tiny-gpt2\"] .state').textContent === 'available'"
        )
    row.get_by_role("button", name="Load", exact=True).click()
    page.wait_for_function(
        "document.querySelector('tr[data-model=\"tiny-gpt2\"] .state').textContent === 'loaded'"
    )
    assert "tiny-gpt2 loaded" in page.locator("#models-status").inner_text()
    row.get_by_role("button", name="Unload", exact=True).click()
    page.wait_for_function(
        "document.querySelector('tr[data-model=\"tiny-gpt2\"] .state').textContent === 'available'"
    )
    page.reload()
    assert page.locator('tr[data-model="tiny-gpt2"] .state').inner_text() == "available"


def test_theme_toggle_switches_and_is_remembered(live_server: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(live_server + "/")
    before = page.evaluate("document.documentElement.dataset.theme")
    page.get_by_role("button", name="Switch light or dark theme").click()
    after = page.evaluate("document.documentElement.dataset.theme")
    assert {before, after} == {"light", "dark"}
    page.reload()
    assert page.evaluate("document.documentElement.dataset.theme") == after


def test_api_docs_render_offline(live_server: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(live_server + "/docs")
    page.locator(".opblock-summary-path", has_text="/api/models").first.wait_for()
    assert all(url.startswith(live_server) for url in page.requests)
