"""The XSS guarantee over a corpus: every server-rendered place that shows what a user
typed (a visualization's text in its page and the gallery, the search box, the home
form shown again after an error, the log-in and sign-up forms shown again) keeps each
payload inert: it never appears as live markup, only escaped (the browser tests check
that nothing runs in Chromium; this covers many payloads cheaply)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from tzoo_testing import form_token, make_settings

from tzoo.web.app import create_app

pytestmark = pytest.mark.usefixtures("cheap_passwords")

CORPUS = [
    "<script>window.__pwned=1</script>",
    "<img src=x onerror=window.__pwned=1>",
    "<svg/onload=window.__pwned=1>",
    '"><script>window.__pwned=1</script>',
    "'><img src=x onerror=window.__pwned=1>",
    "</script><script>window.__pwned=1</script>",
    "</textarea><script>window.__pwned=1</script>",
    '<a href="javascript:window.__pwned=1">x</a>',
    "<iframe srcdoc='<script>parent.__pwned=1</script>'>",
    "<!--<script>window.__pwned=1</script>-->",
    "\u2028</script>\u2029<script>window.__pwned=1</script>",
]
# Markup a payload would add if it went out unescaped (our own pages use none of it
# with "__pwned").
LIVE = re.compile(r"<(script|img|svg|iframe|a)\b[^>]*__pwned|<script>window\.__pwned")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path, visualizations_per_minute=0))) as client:
        yield client


def assert_inert(page: str, payload: str, where: str) -> None:
    assert payload not in page, f"{where}: the payload went out verbatim"
    match = LIVE.search(page)
    assert match is None, f"{where}: live markup {match.group(0)!r}"


@pytest.mark.parametrize("payload", CORPUS)
def test_the_corpus_stays_inert_in_every_page_that_shows_user_text(
    client: TestClient, payload: str
) -> None:
    created = client.post(
        "/api/visualizations", json={"model_name": "tiny-gpt2", "text": f"Hi {payload}"}
    )
    assert created.status_code == 201, created.text
    slug = created.json()["slug"]
    for path in (f"/viz/{slug}", "/gallery", f"/viz/{slug}/export.html"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert_inert(response.text, payload, path)
    # Shown, escaped (so the checks above are not vacuous).
    assert str(escape(payload)) in client.get("/gallery").text
    searched = client.get("/gallery", params={"q": payload[:200]})
    assert_inert(searched.text, payload, "gallery search box")
    token = form_token(client, "/")
    again = client.post(
        "/visualize",
        data={"model_name": "no-such-model", "text": payload, "csrf_token": token},
    )
    assert again.status_code == 404
    assert_inert(again.text, payload, "home form shown again")
    assert str(escape(payload)) in again.text
    for page in ("/login", "/signup"):
        data = {"username": payload, "password": "x", "csrf_token": form_token(client, page)}
        shown = client.post(page, data=data, follow_redirects=False)
        assert shown.status_code in (400, 401), page
        assert_inert(shown.text, payload, f"{page} form shown again")
        assert_inert(client.get(page, params={"next": payload}).text, payload, f"{page}?next=")
