"""Every web route that takes a model name (attention visualizations, the home form, the
token wheel, attribution graphs, validation) treats it as the load route does: no server
path outside TZOO_MODEL_DIRS, one answer whatever is there, and hub loads through the
bounded pool, so made-up hub ids cannot tie up request threads.

Before: an anonymous ``POST /api/visualizations`` with ``model_name: "/etc"`` answered
"no config.json", ``/etc/passwd`` "is not a directory" and a missing path 404 (a probe of
the server's files), and each made-up hub id held a request thread for ~24 s."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tzoo_testing import SlowHub, form_token, make_settings

from tzoo.runtime import tiny
from tzoo.web.app import create_app


def _save_tiny(directory: Path) -> Path:
    tiny.build_model("gpt2").save_pretrained(directory)
    tiny.build_tokenizer("gpt2").save_pretrained(directory)
    return directory


def _attempts(client: TestClient, name: str) -> dict[str, Any]:
    """The answer of every route that takes a model name, for ``name``."""
    csrf = form_token(client, "/")
    home_form = {"model_name": name, "text": "hello there", "csrf_token": csrf}
    return {
        "visualization": client.post(
            "/api/visualizations", json={"model_name": name, "text": "hello there"}
        ),
        "wheel": client.post("/api/sessions", json={"model_name": name}),
        "graph": client.post("/api/graphs", json={"model_name": name, "prompt": "hello there"}),
        "validation": client.post(
            "/api/validations", data={"model_name": name, "csrf_token": csrf}
        ),
        "home form": client.post("/visualize", data=home_form),
    }


def test_no_route_probes_or_loads_server_paths(tmp_path: Path) -> None:
    outside = _save_tiny(tmp_path / "outside" / "gpt")
    (tmp_path / "outside" / "secret.txt").write_text("secret")
    probes = [str(outside), str(tmp_path / "outside" / "secret.txt"), "/etc", "/etc/passwd"]
    probes += ["/no/such/folder", "../outside/gpt"]
    settings = make_settings(tmp_path, model_dirs=[tmp_path / "models"])
    app = create_app(settings)
    with TestClient(app) as client:
        bodies: dict[str, set[bytes]] = {}
        for probe in probes:
            for route, answer in _attempts(client, probe).items():
                if route == "home form":
                    # The form shows the sentence on the page, the same for every path.
                    assert answer.status_code == 403, (probe, answer.text[:300])
                    assert "TZOO_MODEL_DIRS" in answer.text
                    assert "secret" not in answer.text and "is not a directory" not in answer.text
                    continue
                assert answer.status_code == 403, (route, probe, answer.text)
                bodies.setdefault(route, set()).add(answer.content)
        assert all(len(found) == 1 for found in bodies.values()), bodies
        detail = next(iter(bodies["visualization"])).decode()
        assert "TZOO_MODEL_DIRS" in detail and str(outside) not in detail
        assert app.state.manager.loaded_names() == []


def test_a_path_inside_model_dirs_still_works(tmp_path: Path) -> None:
    inside = _save_tiny(tmp_path / "models" / "gpt")
    app = create_app(make_settings(tmp_path, model_dirs=[tmp_path / "models"]))
    with TestClient(app) as client:
        answer = client.post(
            "/api/visualizations", json={"model_name": str(inside), "text": "hello there"}
        )
        assert answer.status_code == 201, answer.text
        assert app.state.manager.loaded_names() == [str(inside.resolve())]


def test_made_up_hub_ids_wait_in_the_bounded_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(tmp_path, hub_load_workers=1, hub_load_timeout=30))
    hub = SlowHub()
    monkeypatch.setattr(app.state.manager, "get", hub.get)
    loader = app.state.model_loader
    with TestClient(app) as client:

        def create(i: int) -> int:
            body = {"model_name": f"nobody/made-up-{i}", "text": "hello there"}
            return client.post("/api/visualizations", json=body).status_code

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(create, i) for i in range(12)]
            # One load runs, the line behind it fills, and the rest are refused at once
            # (503) while the hub still hangs: no request thread waits on them.
            deadline = time.monotonic() + 10
            refused = [f for f in futures if _done_by(f, deadline)]
            assert len(refused) == 12 - loader.max_pending
            assert {f.result() for f in refused} == {503}
            assert hub.peak == 1
            assert client.get("/health").status_code == 200
            hub.release.set()
            statuses = [f.result(timeout=30) for f in futures]
        assert statuses == [503] * 12, statuses
        assert hub.peak == 1


def _done_by(future: Any, deadline: float) -> bool:
    """Whether ``future`` finishes before ``deadline`` (a time.monotonic() value)."""
    try:
        future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return False
    return True
