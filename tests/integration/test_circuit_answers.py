"""Explanations (the circuit agent) on stored graphs over REST, on tiny models with random
transcoders and a real local explainer (tiny-llama: meaningless labels, real generation):
a job's answer equals ``explain_circuit`` called directly with the same arguments, jobs
report their progress and run one at a time per model, answers are stored for good (they
survive a restart of the app and go with their graph), access follows the graph's, and
every bad request gets a clear status and sentence."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update
from test_circuits_api import random_transcoders
from tzoo_testing import make_settings, signed_up

from tzoo.circuits.agent import explain_circuit
from tzoo.circuits.io import load_transcoders, save_transcoders
from tzoo.circuits.labels import LocalExplainer
from tzoo.config import Settings
from tzoo.service.circuits import LOADED_TRANSCODERS
from tzoo.store.artefacts import delete_artefact, get_artefact
from tzoo.store.models import Artefact
from tzoo.web.app import create_app

MODEL = "tiny-llama"
SET_ID = "tiny-llama/plt-random"
GPT2 = "tiny-gpt2"  # graphs on it are labelled by tiny-llama: another model, another lock
GPT2_SET = "tiny-gpt2/plt-random"
PROMPT = "Cats sat on it."  # byte-level tokenizer: one token a character, BOS first
MAX_NODES = 40
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("explanations")


@pytest.fixture(scope="module")
def settings(root: Path) -> Settings:
    # The explainer: tiny-llama, the only tiny decoder whose context holds a label prompt.
    return make_settings(root, transcoders_dir=root / "transcoders", autointerp_model=MODEL)


@pytest.fixture(scope="module")
def app(settings: Settings, root: Path) -> Iterator[FastAPI]:
    LOADED_TRANSCODERS.clear()
    app = create_app(settings)
    for model, set_id in ((MODEL, SET_ID), (GPT2, GPT2_SET)):
        handle = app.state.manager.get(model)
        save_transcoders(random_transcoders(handle, seed=0), root / "transcoders" / set_id)
    with TestClient(app):
        yield app
    LOADED_TRANSCODERS.clear()


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app)  # no `with`: the module's app is started already


def create_graph(client: TestClient, model: str = MODEL, set_id: str = SET_ID, **body: Any) -> str:
    request = {
        "model_name": model,
        "transcoders": set_id,
        "prompt": PROMPT,
        "max_feature_nodes": MAX_NODES,
        **body,
    }
    response = client.post("/api/graphs", json=request)
    assert response.status_code == 201, response.text
    return str(response.json()["slug"])


@pytest.fixture(scope="module")
def graph(app: FastAPI) -> dict[str, Any]:
    """A tiny-llama graph's document."""
    client = TestClient(app)
    slug = create_graph(client)
    document: dict[str, Any] = client.get(f"/api/graphs/{slug}").json()
    return document


def submit(client: TestClient, slug: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"/api/graphs/{slug}/explanations", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/api/graphs/{slug}/explanations/{job['id']}"
    return job


def status(client: TestClient, slug: str, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/graphs/{slug}/explanations/{job_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def until(check: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool]) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = check()
        if done(found):
            return found
        time.sleep(0.02)
    pytest.fail(f"still waiting after {TIMEOUT_S} s: {found}")


def finished(client: TestClient, slug: str, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = until(
        lambda: status(client, slug, job_id), lambda s: s["state"] in ("done", "failed")
    )
    return found


def direct(app: FastAPI, model: str, set_id: str, target: int, **options: Any) -> dict[str, Any]:
    """``explain_circuit`` called here with the arguments the job should have used, as JSON."""
    handle = app.state.manager.get(model)
    transcoders = load_transcoders(app.state.settings.transcoders_dir / set_id, handle=handle)
    answer = explain_circuit(
        handle, transcoders, PROMPT, target, max_feature_nodes=MAX_NODES, **options
    )
    return comparable(json.loads(json.dumps(answer.to_dict())))


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without the attribution's timing, the one thing two runs differ in."""
    stats = {k: v for k, v in answer["graph_stats"].items() if k != "seconds"}
    return {**answer, "graph_stats": stats}


def feature_steps(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for path in answer["paths"] for step in path["steps"] if step["kind"] == "feature"]


# -- answers --------------------------------------------------------------------------------------


def test_an_explanation_equals_explain_circuit_and_is_stored(
    client: TestClient, app: FastAPI, graph: dict[str, Any]
) -> None:
    slug, info = graph["metadata"]["slug"], graph["tzoo"]
    target = info["logit_tokens"][1]
    job = submit(client, slug, target=target, n_paths=8, label=False)
    assert job["state"] in ("queued", "running") and job["answer"] is None
    assert job["request"] == {
        "target": target,
        "target_token": target,
        "n_paths": 8,
        "label": False,
    }
    done = finished(client, slug, job["id"])
    assert done["state"] == "done", done["error"]
    expected = direct(
        app, MODEL, SET_ID, target, target_position=info["target_position"], n_paths=8, label=False
    )
    assert comparable(done["answer"]) == expected
    assert len(expected["paths"]) == 8 and feature_steps(expected), "a path through a feature"
    assert done["answer"]["target_text"] == info["logit_strings"][1]
    assert done["answer"]["target_probability"] == pytest.approx(info["logit_probabilities"][1])
    assert done["explainer"] is None and done["answer"]["labels"] == {}
    # Stored for good, at a permalink of the graph page.
    saved_id = done["explanation_id"]
    assert done["url"] == f"http://testserver/graph/{slug}?explanation={saved_id}"
    saved = status(client, slug, saved_id)
    assert saved["answer"] == done["answer"] and saved["state"] == "done"
    assert saved["id"] == saved_id and saved["job_id"] is None
    assert saved["request"] == job["request"]
    listed = client.get(f"/api/graphs/{slug}/explanations").json()
    (mine,) = [item for item in listed if item["id"] == saved_id]
    assert mine["target_token"] == target and mine["target_text"] == info["logit_strings"][1]
    assert mine["n_paths"] == 8 and mine["label"] is False and mine["url"] == done["url"]
    with app.state.session_factory() as session:
        row = get_artefact(session, saved_id)
        assert row is not None and row.kind == "circuit_answer" and row.input_text == slug
        assert row.visibility == "unlisted" and row.model_name == MODEL
    page = client.get(f"/graph/{slug}", params={"explanation": saved_id})
    assert page.status_code == 200 and f'"explanation": "{saved_id}"' in page.text


def test_a_labelled_explanation_reports_its_stages_and_equals_explain_circuit(
    client: TestClient, app: FastAPI
) -> None:
    """A graph on tiny-gpt2 labelled by tiny-llama: holding tiny-llama's lock here stops
    the job when it starts labelling, so its progress can be read at that point."""
    slug = create_graph(client, GPT2, GPT2_SET)
    info = client.get(f"/api/graphs/{slug}").json()["tzoo"]
    options = {"target_position": info["target_position"], "n_paths": 4}
    target = next(  # the likeliest token with a path through a feature
        token
        for token in info["logit_tokens"]
        if feature_steps(direct(app, GPT2, GPT2_SET, token, label=False, **options))
    )
    explainer = app.state.manager.get(MODEL)
    with explainer.lock:
        job = submit(client, slug, target=target, n_paths=4)
        paused = until(
            lambda: status(client, slug, job["id"]),
            lambda s: s["stage"] == "dashboards" and s["done"] == s["total"],
        )
        assert paused["state"] == "running" and paused["position"] == 0
        assert paused["total"] >= 1 and paused["explainer"] == MODEL
    done = finished(client, slug, job["id"])
    assert done["state"] == "done", done["error"]
    expected = direct(
        app,
        GPT2,
        GPT2_SET,
        target,
        label=True,
        explainer=LocalExplainer(explainer),
        **options,
    )
    assert comparable(done["answer"]) == expected
    features = {f"{s['layer']}/{s['feature']}" for s in feature_steps(expected)}
    assert features and set(expected["labels"]) == features
    assert all(isinstance(label, str) and label for label in expected["labels"].values())
    assert all(
        s["label"] == expected["labels"][f"{s['layer']}/{s['feature']}"]
        for s in feature_steps(done["answer"])
    )
    assert done["explainer"] == MODEL


def test_jobs_for_one_model_wait_their_turn(
    client: TestClient, app: FastAPI, graph: dict[str, Any]
) -> None:
    """Holding the model as a running analysis does keeps both jobs waiting: the first
    has started (it waits for the model), the second is next in the queue."""
    slug, tokens = graph["metadata"]["slug"], graph["tzoo"]["logit_tokens"]
    handle = app.state.manager.get(MODEL)
    with handle.lock:
        first = submit(client, slug, target=tokens[0], n_paths=2, label=False)
        second = submit(client, slug, target=tokens[2], n_paths=2, label=False)
        until(lambda: status(client, slug, first["id"]), lambda s: s["state"] == "running")
        time.sleep(0.5)  # a job that did not wait for the model would be done by now
        running = status(client, slug, first["id"])
        assert running["state"] == "running" and running["stage"] == "loading"
        assert running["position"] == 0
        waiting = status(client, slug, second["id"])
        assert waiting["state"] == "queued" and waiting["position"] == 1
        assert waiting["stage"] is None and waiting["answer"] is None
    for job in (first, second):
        done = finished(client, slug, job["id"])
        assert (
            done["state"] == "done" and done["answer"]["target_token"] == job["request"]["target"]
        )
        assert done["position"] is None and done["stage"] is None


def test_too_many_waiting_jobs_are_refused(
    client: TestClient, app: FastAPI, graph: dict[str, Any]
) -> None:
    slug, token = graph["metadata"]["slug"], graph["tzoo"]["logit_tokens"][0]
    jobs = app.state.explanation_jobs
    jobs.max_waiting = 1
    try:
        with app.state.manager.get(MODEL).lock:
            first = submit(client, slug, target=token, n_paths=1, label=False)
            full = client.post(f"/api/graphs/{slug}/explanations", json={"target": token})
            assert full.status_code == 503 and "try again" in full.json()["detail"]
            assert full.headers["retry-after"]
    finally:
        jobs.max_waiting = 16
    assert finished(client, slug, first["id"])["state"] == "done"


def test_finished_jobs_are_forgotten_but_their_answers_stay(
    client: TestClient, app: FastAPI, graph: dict[str, Any]
) -> None:
    slug, token = graph["metadata"]["slug"], graph["tzoo"]["logit_tokens"][0]
    jobs = app.state.explanation_jobs
    jobs.max_finished = 2
    try:
        done = []
        for _ in range(3):
            job = submit(client, slug, target=token, n_paths=1, label=False)
            done.append(finished(client, slug, job["id"]))
        oldest = client.get(f"/api/graphs/{slug}/explanations/{done[0]['id']}")
        assert oldest.status_code == 404
        assert status(client, slug, done[0]["explanation_id"])["answer"] == done[0]["answer"]
        assert status(client, slug, done[2]["id"])["state"] == "done"
        assert len(jobs._jobs) <= 2
    finally:
        jobs.max_finished = 64


def test_a_set_retrained_while_the_job_waits_fails_the_job(
    client: TestClient, app: FastAPI, root: Path
) -> None:
    other = "tiny-llama/retrained-while-waiting"
    handle = app.state.manager.get(MODEL)
    save_transcoders(random_transcoders(handle, seed=5), root / "transcoders" / other)
    slug = create_graph(client, set_id=other)
    with handle.lock:
        job = submit(client, slug, target=0, n_paths=1, label=False)
        save_transcoders(random_transcoders(handle, seed=6), root / "transcoders" / other)
    failed = finished(client, slug, job["id"])
    assert failed["state"] == "failed" and failed["answer"] is None
    assert failed["error"]["status"] == 409 and "retrained" in failed["error"]["detail"]
    assert failed["explanation_id"] is None
    # Now refused at once.
    again = client.post(f"/api/graphs/{slug}/explanations", json={"target": 0})
    assert again.status_code == 409 and "retrained" in again.json()["detail"]


def test_a_graph_deleted_while_its_job_waits_fails_the_job(
    client: TestClient, app: FastAPI
) -> None:
    slug = create_graph(client, prompt="Gone soon.")
    with app.state.manager.get(MODEL).lock:
        job = submit(client, slug, target="C", n_paths=1, label=False)
        with app.state.session_factory() as session:  # anonymous graphs: no owner to delete
            assert delete_artefact(session, slug)
    failed = until(
        lambda: app.state.explanation_jobs.status(app.state.explanation_jobs.get(job["id"], slug)),
        lambda s: s["state"] in ("done", "failed"),
    )
    assert failed["state"] == "failed" and failed["error"]["status"] == 422
    assert "was deleted" in failed["error"]["detail"] and failed["explanation_id"] is None
    # The graph's routes answer 404 now, the job's included.
    assert client.get(f"/api/graphs/{slug}/explanations/{job['id']}").status_code == 404


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status_code", "detail"),
    [
        ({"target": "Cats"}, 422, "is 4 tokens (['C', 'a', 't', 's'])"),
        ({"target": 10**6}, 422, "outside the vocabulary"),
        ({"target": ""}, 422, "target"),
        ({"target": True}, 422, "target"),
        ({"target": 1.5}, 422, "target"),
        ({"target": "x" * 201}, 422, "target"),
        ({}, 422, "target"),
        ({"target": "C", "n_paths": 0}, 422, "n_paths"),
        ({"target": "C", "n_paths": 21}, 422, "n_paths"),
        ({"target": "C", "label": "maybe"}, 422, "label"),
        ({"target": "C", "mode": "fast"}, 422, "mode"),
    ],
)
def test_bad_explanation_requests_get_clear_errors(
    client: TestClient, graph: dict[str, Any], body: dict[str, Any], status_code: int, detail: str
) -> None:
    slug = graph["metadata"]["slug"]
    response = client.post(f"/api/graphs/{slug}/explanations", json=body)
    assert response.status_code == status_code, response.text
    assert detail in json.dumps(response.json()["detail"], ensure_ascii=False).replace('\\"', '"')


def test_unknown_graphs_and_explanations_are_404(client: TestClient, graph: dict[str, Any]) -> None:
    slug = graph["metadata"]["slug"]
    assert client.post("/api/graphs/nope/explanations", json={"target": "C"}).status_code == 404
    assert client.get("/api/graphs/nope/explanations").status_code == 404
    missing = client.get(f"/api/graphs/{slug}/explanations/nope")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "No explanation with this id for this graph."
    assert client.get(f"/graph/{slug}", params={"explanation": "nope"}).status_code == 404
    # A view's id and another graph's explanation are no explanation of this graph.
    view = client.post(
        f"/api/graphs/{slug}/views", json={"node_threshold": 0.5, "edge_threshold": 0.5}
    ).json()["view_id"]
    assert client.get(f"/api/graphs/{slug}/explanations/{view}").status_code == 404
    other = create_graph(client, prompt="Dogs ran.")
    job = submit(client, other, target="C", n_paths=1, label=False)
    saved = finished(client, other, job["id"])["explanation_id"]
    for wrong in (job["id"], saved):
        assert client.get(f"/api/graphs/{slug}/explanations/{wrong}").status_code == 404
    assert saved not in {e["id"] for e in client.get(f"/api/graphs/{slug}/explanations").json()}


def test_a_graph_whose_model_or_transcoders_are_gone_is_refused_as_graph_creation_is(
    client: TestClient, app: FastAPI, root: Path
) -> None:
    handle = app.state.manager.get(MODEL)
    gone = "tiny-llama/gone"
    save_transcoders(random_transcoders(handle, seed=7), root / "transcoders" / gone)
    slug = create_graph(client, set_id=gone)
    for file in (root / "transcoders" / gone).iterdir():
        file.unlink()
    (root / "transcoders" / gone).rmdir()
    missing = client.post(f"/api/graphs/{slug}/explanations", json={"target": "C"})
    assert missing.status_code == 404
    assert "No transcoder set 'tiny-llama/gone'" in missing.json()["detail"]
    assert SET_ID in missing.json()["detail"]  # the sets there are
    # A model no longer in the catalogue: the graph form's 404.
    with app.state.session_factory() as session:
        session.execute(update(Artefact).where(Artefact.slug == slug).values(model_name="gpt-17"))
        session.commit()
    unknown = client.post(f"/api/graphs/{slug}/explanations", json={"target": "C"})
    assert unknown.status_code == 404 and "Unknown model 'gpt-17'" in unknown.json()["detail"]


def test_a_model_without_transcoders_says_how_to_train_some(tmp_path: Path) -> None:
    """The set's folder gone and no other set for the model: the form's 409 with the
    command that trains one."""
    settings = make_settings(tmp_path, transcoders_dir=tmp_path / "transcoders")
    app = create_app(settings)
    handle = app.state.manager.get(MODEL)
    folder = tmp_path / "transcoders" / SET_ID
    save_transcoders(random_transcoders(handle, seed=0), folder)
    with TestClient(app) as client:
        slug = create_graph(client, max_feature_nodes=8)
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
        response = client.post(f"/api/graphs/{slug}/explanations", json={"target": "C"})
        assert response.status_code == 409
        assert "`tzoo transcoders train --model tiny-llama`" in response.json()["detail"]


# -- permanence and access ------------------------------------------------------------------------


def test_answers_survive_a_restart_of_the_app(
    client: TestClient, graph: dict[str, Any], settings: Settings
) -> None:
    slug = graph["metadata"]["slug"]
    job = submit(client, slug, target="t", n_paths=2, label=False)
    done = finished(client, slug, job["id"])
    saved_id = done["explanation_id"]
    with TestClient(create_app(settings)) as restarted:
        again = restarted.get(f"/api/graphs/{slug}/explanations/{saved_id}")
        assert again.status_code == 200 and again.json()["answer"] == done["answer"]
        assert again.json()["request"]["target"] == "t"
        assert saved_id in {
            e["id"] for e in restarted.get(f"/api/graphs/{slug}/explanations").json()
        }
        page = restarted.get(f"/graph/{slug}", params={"explanation": saved_id})
        assert page.status_code == 200 and f'"explanation": "{saved_id}"' in page.text
        # The job itself lived in the old app's memory only.
        assert restarted.get(f"/api/graphs/{slug}/explanations/{job['id']}").status_code == 404
        # A stopping app takes no more jobs.
        restarted.app.state.explanation_jobs.shutdown()  # type: ignore[attr-defined]
        closing = restarted.post(f"/api/graphs/{slug}/explanations", json={"target": "t"})
        assert closing.status_code == 503 and "shutting down" in closing.json()["detail"]


@pytest.mark.usefixtures("cheap_passwords")
def test_explanations_of_a_private_graph_are_its_owner_s_and_go_with_it(app: FastAPI) -> None:
    ada, bob, anonymous = TestClient(app), TestClient(app), TestClient(app)
    ada_csrf = signed_up(ada, "ada-explains")
    bob_csrf = signed_up(bob, "bob-explains")
    headers = {"X-CSRF-Token": ada_csrf}
    response = ada.post(
        "/api/graphs",
        json={
            "model_name": MODEL,
            "transcoders": SET_ID,
            "prompt": "secret plans",
            "visibility": "private",
            "max_feature_nodes": 10,
        },
        headers=headers,
    )
    assert response.status_code == 201, response.text
    slug = response.json()["slug"]
    body = {"target": "s", "n_paths": 2, "label": False}
    # Writes with the login cookie need the CSRF header.
    assert ada.post(f"/api/graphs/{slug}/explanations", json=body).status_code == 403
    created = ada.post(f"/api/graphs/{slug}/explanations", json=body, headers=headers)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    saved_id = finished(ada, slug, job_id)["explanation_id"]
    assert [e["id"] for e in ada.get(f"/api/graphs/{slug}/explanations").json()] == [saved_id]
    assert ada.get(f"/api/graphs/{slug}/explanations").json()[0]["owner"] == "ada-explains"
    for other in (bob, anonymous):
        for path in (
            f"/api/graphs/{slug}/explanations",
            f"/api/graphs/{slug}/explanations/{job_id}",
            f"/api/graphs/{slug}/explanations/{saved_id}",
            f"/graph/{slug}?explanation={saved_id}",
        ):
            assert other.get(path).status_code == 404, path
        csrf = {"X-CSRF-Token": bob_csrf} if other is bob else {}
        refused = other.post(f"/api/graphs/{slug}/explanations", json=body, headers=csrf)
        assert refused.status_code == 404
    with app.state.session_factory() as session:
        row = get_artefact(session, saved_id)
        assert row is not None and row.visibility == "private" and row.owner == "ada-explains"
    # The answer is deleted with its graph.
    assert ada.delete(f"/api/graphs/{slug}", headers=headers).status_code == 204
    with app.state.session_factory() as session:
        assert get_artefact(session, saved_id) is None
