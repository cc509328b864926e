"""The REST API over the real app (in-process client), including every error path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tzoo_testing import make_settings

from tzoo.config import Settings
from tzoo.runtime import tiny
from tzoo.runtime.catalogue import ModelSpec, register_model, unregister_model
from tzoo.web.app import create_app

MiB = 2**20
# Loading and unloading are the operator's: the holder of TZOO_API_KEY is one.
OPERATOR_KEY = "operator-key-for-tests"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


def operator_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings with the operator's key, and tmp_path as a folder the web may load from."""
    overrides.setdefault("api_key", OPERATOR_KEY)
    overrides.setdefault("model_dirs", [tmp_path])
    return make_settings(tmp_path, **overrides)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(operator_settings(tmp_path))) as test_client:
        yield test_client


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_models_lists_catalogue_with_required_fields(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/api/models").json()}
    assert {"smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"} <= set(
        models
    )
    for row in models.values():
        assert {"name", "architecture", "loaded", "size_bytes"} <= set(row)
    assert models["tiny-t5"]["architecture"] == "encoder-decoder"
    assert models["minilm-l6"]["size_bytes"] > 80 * MiB


def test_load_and_unload_round_trip(client: TestClient) -> None:
    loaded = client.post("/api/models/tiny-llama/load", headers=OPERATOR)
    assert loaded.status_code == 200
    body = loaded.json()
    assert (body["n_layers"], body["n_heads"], body["n_kv_heads"]) == (2, 4, 2)
    assert body["memory_used_bytes"] == body["size_bytes"] > 0
    models = {m["name"]: m for m in client.get("/api/models").json()}
    assert models["tiny-llama"]["loaded"] is True
    unloaded = client.post("/api/models/tiny-llama/unload", headers=OPERATOR).json()
    assert unloaded == {"name": "tiny-llama", "unloaded": True, "memory_used_bytes": 0}
    second = client.post("/api/models/tiny-llama/unload", headers=OPERATOR)
    assert second.json()["unloaded"] is False


def test_unknown_model_is_404_naming_known_models(client: TestClient) -> None:
    for path in ("/api/models/gpt-17/load", "/api/models/gpt-17/unload"):
        response = client.post(path, headers=OPERATOR)
        assert response.status_code == 404
        body = response.json()
        assert "gpt-17" in body["detail"] and "tiny-gpt2" in body["known"]


def test_model_over_budget_is_413_with_sizes(tmp_path: Path) -> None:
    with TestClient(create_app(operator_settings(tmp_path, memory_budget_mb=0.25))) as client:
        response = client.post("/api/models/tiny-gpt2/load", headers=OPERATOR)
    assert response.status_code == 413
    body = response.json()
    assert body["size_bytes"] > body["limit_bytes"] == int(0.25 * MiB)
    assert "MiB" in body["detail"]


def test_directory_that_is_not_a_model_is_422(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    response = client.post(f"/api/models/{tmp_path / 'empty'}/load", headers=OPERATOR)
    assert response.status_code == 422
    assert "not a model" in response.json()["detail"]


def test_corrupt_weights_are_422_and_the_server_keeps_working(
    client: TestClient, tmp_path: Path
) -> None:
    directory = tmp_path / "corrupt"
    tiny.build_model("gpt2").save_pretrained(directory)
    tiny.build_tokenizer("gpt2").save_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    response = client.post(f"/api/models/{directory}/load", headers=OPERATOR)
    assert response.status_code == 422
    assert "Cannot load a model" in response.json()["detail"]
    assert client.post("/api/models/tiny-gpt2/load", headers=OPERATOR).status_code == 200


def test_unexpected_errors_are_500_without_a_trace(tmp_path: Path) -> None:
    from tzoo.runtime.sources import TinySource

    class BrokenSource(TinySource):
        def load(self, options):  # type: ignore[no-untyped-def]
            raise RuntimeError("disk on fire")

    register_model(ModelSpec("broken", "explodes", "decoder", BrokenSource("gpt2")), replace=True)
    try:
        app = create_app(operator_settings(tmp_path))
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.post("/api/models/broken/load", headers=OPERATOR)
    finally:
        unregister_model("broken")
    assert response.status_code == 500
    assert "disk on fire" not in response.text and "Traceback" not in response.text


def test_ready_is_503_until_preloaded_models_are_loaded(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, preload=["tiny-t5"]))
    with TestClient(app) as client:
        first = client.get("/ready")
        app.state.preloader.join(timeout=60)
        second = client.get("/ready")
    if first.status_code == 503:  # the tiny model may already be loaded on a fast machine
        assert first.json()["ready"] is False
    assert second.status_code == 200
    assert second.json() == {"ready": True, "models": {"tiny-t5": "ready"}, "errors": {}}


def test_ready_reports_a_failed_preload(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, preload=["no-such-model"]))
    with TestClient(app) as client:
        app.state.preloader.join(timeout=60)
        response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["models"] == {"no-such-model": "failed"}
    assert "Unknown model" in body["errors"]["no-such-model"]


def test_openapi_docs_and_static_files_are_served_locally(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower() and "/static/vendor/swagger-ui/" in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/static/vendor/swagger-ui/{asset}").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/api/models/{name}/load" in schema["paths"]
    css = client.get("/static/css/tzoo.css")
    assert css.status_code == 200 and "--bg" in css.text


def test_home_page_lists_tools_and_models_without_cdn(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    for text in ("Attention explorer", "Token wheel", "smollm2-135m", "minilm-l6", "tiny-t5"):
        assert text in page.text
    # Every script and stylesheet is served by us.
    assert "https://" not in page.text.split("<footer")[0].replace('href="/docs"', "")


def test_migrations_run_on_start(tmp_path: Path) -> None:
    from sqlalchemy import inspect

    app = create_app(make_settings(tmp_path))
    with TestClient(app):
        tables = inspect(app.state.engine).get_table_names()
    assert "artefacts" in tables and "alembic_version" in tables


@pytest.mark.parametrize(
    ("name", "status", "phrase"),
    [
        ("a" * 5000, 422, "at most 1024 characters"),
        ("a" * 300, 404, "Unknown model"),  # longer than a file name may be
        ("x%01y", 422, "control characters"),
        ("%20", 422, "model name is required"),
        # A path, and not an absolute one under TZOO_MODEL_DIRS: refused without a look.
        ("~nobody-here/x", 403, "TZOO_MODEL_DIRS"),
    ],
)
def test_malformed_model_names_get_clear_errors(
    client: TestClient, name: str, status: int, phrase: str
) -> None:
    response = client.post(f"/api/models/{name}/load", headers=OPERATOR)
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"]
