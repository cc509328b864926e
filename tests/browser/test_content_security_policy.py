"""Every page works under its Content-Security-Policy in a real browser: the policy
allows only this server's files and the inline scripts carrying the response's nonce,
and no page (the vendored Swagger UI included) trips it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

# Each page, and a selector that shows its scripts ran (None: the page has no script of
# its own beyond the theme toggle).
PAGES: dict[str, str | None] = {
    "/": None,
    "/gallery": None,
    "/wheel": "#tzoo-wheel[data-ready=true]",
    "/lens": "#tzoo-lens[data-ready=true]",
    "/graph": None,
    "/validate": None,
    "/docs": ".opblock-summary-path",
    "/login": None,
    "/signup": None,
}
VIOLATION_HOOK = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));
"""


@pytest.fixture(scope="module")
def viz_path(live_server: str) -> str:
    response = httpx.post(
        live_server + "/api/visualizations",
        json={"model_name": "tiny-gpt2", "text": "The cat sat on the mat."},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    return f"/viz/{response.json()['slug']}"


def test_no_page_trips_the_content_security_policy(
    browser: Any, live_server: str, viz_path: str
) -> None:
    context = browser.new_context()
    context.add_init_script(VIOLATION_HOOK)
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    pages = {**PAGES, viz_path: "#tzoo-attention[data-ready=true]"}
    for path, ready in pages.items():
        response = page.goto(live_server + path)
        assert response is not None and response.ok, path
        assert "script-src 'self' 'nonce-" in response.headers["content-security-policy"]
        if ready:
            page.wait_for_selector(ready, timeout=30_000)
        page.wait_for_load_state("load")
        page.wait_for_timeout(300)  # late module scripts and their fetches
        violations = page.evaluate("window.__csp")
        assert violations == [], f"{path}: {violations}"
        csp_errors = [p for p in problems if "Content Security Policy" in p]
        assert csp_errors == [], f"{path}: {csp_errors}"
        assert [p for p in problems if p.startswith("page error")] == [], f"{path}: {problems}"
        problems.clear()
    assert all(url.startswith(live_server) for url in requests)
    context.close()


def test_a_framing_page_elsewhere_gets_nothing(live_server: str) -> None:
    response = httpx.get(live_server + "/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
