"""A real server in a subprocess and Debian's chromium, driven by Playwright.

Browser tests skip with a reason when chromium is missing, except on CI (CI=true), where
that is a failure: `make test` installs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tzoo_testing import run_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session", autouse=True)
def _predicates_without_eval() -> Iterator[None]:
    """Our pages' Content-Security-Policy allows no eval, and Playwright re-checks a
    ``wait_for_function`` expression by eval() in the page (only its first check is
    exempt); a predicate given as a function is compiled by DevTools, which CSP allows.
    So bare expressions become arrow functions, and the tests run under the real policy."""
    from playwright.sync_api import Page

    original = Page.wait_for_function

    def wait_for_function(self: Page, expression: str, **kwargs: Any) -> Any:
        if "=>" not in expression and not expression.lstrip().startswith(("function", "async")):
            expression = f"() => ({expression})"
        return original(self, expression, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Page, "wait_for_function", wait_for_function)
        yield


@pytest.fixture(scope="session")
def live_server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The live server's folder: its data (database) is under ``data``."""
    return tmp_path_factory.mktemp("live-server")


@pytest.fixture(scope="session")
def live_server(live_server_root: Path) -> Iterator[str]:
    with run_server(live_server_root) as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing on CI: `make test` should have installed it")
        pytest.skip("browser tests need Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield instance
        instance.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.requests = requests  # every URL the page asked for, to prove nothing left the host
    yield page
    context.close()
