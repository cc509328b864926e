"""Helpers the tests import (conftest modules are not importable by name)."""

from __future__ import annotations

from pathlib import Path

from tzoo.config import Settings


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings rooted in ``tmp_path`` with any overrides."""
    values: dict[str, object] = {"data_dir": tmp_path / "data", "cache_dir": tmp_path / "cache"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# --- logged-in and anonymous browsers for the web tests -----------------------------------

import re  # noqa: E402

from fastapi.testclient import TestClient  # noqa: E402

PASSWORD = "correct horse battery"
FORM_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
META_TOKEN = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def form_token(client: TestClient, page: str = "/login") -> str:
    """The CSRF token of a page's form (anonymous visitors get a signed nonce)."""
    match = FORM_TOKEN.search(client.get(page).text)
    assert match, f"no csrf_token field on {page}"
    return match.group(1)


def signed_up(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Sign ``client`` up as ``username`` (logged in afterwards); return its CSRF token for
    JSON writes (the ``X-CSRF-Token`` header)."""
    data = {
        "username": username,
        "password": password,
        "password_confirm": password,
        "csrf_token": form_token(client, "/signup"),
    }
    response = client.post("/signup", data=data, follow_redirects=False)
    assert response.status_code == 303, response.text
    match = META_TOKEN.search(client.get("/account").text)
    assert match, "no csrf-token meta tag after signing up"
    return match.group(1)
