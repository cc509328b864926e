"""The durability guarantee: ``kill -9`` of a live server in the middle of writes loses
nothing it acknowledged, on SQLite and on PostgreSQL.

Clients create visualizations (tiny-gpt2, short texts) in a loop from several threads;
after N acknowledgements (201 with a slug) the server gets SIGKILL while more writes are
in flight. A new server on the same store must read back every acknowledged slug intact
(the same tokens, and the same attention, bytes and shape, as the same text computed
afresh), and every row it lists must read back whole: an interrupted write leaves
nothing or everything, never half.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from tzoo_testing import server_process

ACKNOWLEDGED = 12  # writes acknowledged before the kill
WRITERS = 4


def create(client: httpx.Client, url: str, text: str) -> httpx.Response:
    return client.post(
        f"{url}/api/visualizations", json={"model_name": "tiny-gpt2", "text": text}, timeout=60
    )


def snapshot(client: httpx.Client, url: str, slug: str) -> tuple[list[str], str, bytes]:
    """What an acknowledged visualization must still hold: tokens, layer 0's shape and
    bytes."""
    meta = client.get(f"{url}/api/visualizations/{slug}", timeout=30)
    assert meta.status_code == 200, f"{slug}: {meta.status_code} {meta.text[:200]}"
    layer = client.get(f"{url}/api/visualizations/{slug}/attention", params={"layer": 0})
    assert layer.status_code == 200, f"{slug}: layer 0 {layer.status_code}"
    return meta.json()["tokens"], layer.headers["X-Tzoo-Shape"], layer.content


def write_until_killed(url: str, process: subprocess.Popen[bytes]) -> dict[str, str]:
    """Writers in a loop; SIGKILL once ACKNOWLEDGED writes are acknowledged (more are in
    flight then). The acknowledged ones: slug -> text."""
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def writer(number: int) -> None:
        with httpx.Client() as client:
            for i in range(1000):
                text = f"Writer {number} wrote line {i} before the crash."
                try:
                    response = create(client, url, text)
                except httpx.HTTPError:
                    return  # the server is gone: this write was never acknowledged
                if response.status_code != 201:
                    return
                with lock:
                    acknowledged[response.json()["slug"]] = text
                    if len(acknowledged) >= ACKNOWLEDGED:
                        enough.set()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    assert enough.wait(120), "the server did not acknowledge enough writes in 120 s"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    for thread in threads:
        thread.join(timeout=60)
    with lock:
        return dict(acknowledged)


def check_kill_9_loses_nothing_acknowledged(root: Path, env: dict[str, str]) -> None:
    env = {"TZOO_VISUALIZATIONS_PER_MINUTE": "0", **env}  # writes as fast as they come
    with server_process(root, env, start_timeout=90) as (url, process):
        with httpx.Client() as client:  # load the model before the clock starts
            assert create(client, url, "warm up").status_code == 201
        acknowledged = write_until_killed(url, process)
        assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= ACKNOWLEDGED
    with server_process(root, env, start_timeout=90) as (url, _), httpx.Client() as client:
        for slug, text in acknowledged.items():
            tokens, shape, data = snapshot(client, url, slug)
            fresh = create(client, url, text)
            assert fresh.status_code == 201
            assert (tokens, shape, data) == snapshot(client, url, fresh.json()["slug"]), slug
            assert len(tokens) >= 8  # "Writer N wrote line I before the crash."
        # Every row the store lists reads back whole, the interrupted writes' too.
        listed = client.get(f"{url}/api/visualizations", params={"limit": 200}).json()
        assert {row["slug"] for row in listed} >= set(acknowledged)
        for row in listed:
            snapshot(client, url, row["slug"])


@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged_on_sqlite(tmp_path: Path) -> None:
    check_kill_9_loses_nothing_acknowledged(tmp_path, {})


@pytest.mark.slow
@pytest.mark.postgres
def test_kill_9_loses_nothing_acknowledged_on_postgres(
    tmp_path: Path, postgres_schema_url: str
) -> None:
    check_kill_9_loses_nothing_acknowledged(tmp_path, {"TZOO_DATABASE_URL": postgres_schema_url})
