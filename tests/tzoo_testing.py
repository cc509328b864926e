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
def server_process(
    root: Path, env: dict[str, str] | None = None, *, start_timeout: float = 60
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``tzoo serve`` in a subprocess with its data and cache under ``root`` (and ``env``
    on top); yields its URL and process once /health answers (a test may kill it), and
    stops it afterwards if it still runs. Each start logs to a file of its own."""
    port = _free_port()
    full_env = {
        **os.environ,
        "TZOO_DATA_DIR": str(root / "data"),
        "TZOO_CACHE_DIR": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    log_path = root / f"server-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tzoo.cli", "serve", "--port", str(port)],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if process.poll() is not None:
                    pytest.fail(f"server exited early: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not answer /health within {start_timeout:g} s")
                time.sleep(0.2)
            yield url, process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextmanager
def run_server(root: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``tzoo serve`` in a subprocess (see ``server_process``); yields its URL."""
    with server_process(root, env) as (url, _):
        yield url


# --- a model hub that never answers -------------------------------------------------------

import threading  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402


class SlowHub:
    """Stands in for ``ModelManager.get`` on an unreachable hub: each load blocks until
    ``release`` is set (30 s at most), then fails as the real one does. Counts calls per
    name and the most loads running at once (``peak``)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: Counter[str] = Counter()
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def get(self, name: str, **_: Any) -> Any:
        from tzoo.runtime.errors import ModelUnavailableError

        with self._lock:
            self.calls[name] += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            self.release.wait(30)
        finally:
            with self._lock:
                self.running -= 1
        raise ModelUnavailableError(f"{name} is not cached and the model hub is not reachable.")


# --- coroutines from sync tests -----------------------------------------------------------

from collections.abc import Coroutine  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import TypeVar  # noqa: E402

T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    """``asyncio.run(coroutine)`` on a thread of its own: Playwright's sync API (browser
    tests in the same run) keeps an event loop running on the main thread, where
    asyncio.run() is refused."""
    import asyncio

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=timeout)
