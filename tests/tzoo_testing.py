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


# --- a live server for the browser tests --------------------------------------------------

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_server(root: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``tzoo serve`` in a subprocess with its data and cache under ``root`` (and ``env``
    on top); yields its URL once /health answers, stops it afterwards."""
    port = _free_port()
    full_env = {
        **os.environ,
        "TZOO_DATA_DIR": str(root / "data"),
        "TZOO_CACHE_DIR": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tzoo.cli", "serve", "--port", str(port)],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("server did not answer /health within 60 s")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
