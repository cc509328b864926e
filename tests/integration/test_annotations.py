"""Annotations over the real app and the store, on each database backend."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tzoo_testing import FORM_TOKEN, META_TOKEN, PASSWORD, make_settings

from tzoo.store import (
    Anchor,
    Annotation,
    AnnotationError,
    create_annotation,
    create_artefact,
    create_user,
    delete_annotation,
    delete_artefact,
    get_artefact,
    list_annotations,
)
from tzoo.store.annotations import thread_order
from tzoo.web.app import create_app

pytestmark = pytest.mark.usefixtures("cheap_passwords")
PARAMS = {"n_layers": 2, "n_heads": 4, "n_tokens": 5}


@pytest.fixture
def app(tmp_path: Path, database_url: str) -> Iterator[FastAPI]:
    app = create_app(make_settings(tmp_path, database_url=database_url))
    with TestClient(app):  # the lifespan migrates the database
        yield app


class Browser:
    """A logged-in browser: its client, and its CSRF header for writes."""

    def __init__(self, app: FastAPI, username: str) -> None:
        self.client = TestClient(app)
        page = self.client.get("/signup").text
        data = {
            "username": username,
            "password": PASSWORD,
            "password_confirm": PASSWORD,
            "csrf_token": FORM_TOKEN.search(page).group(1),  # type: ignore[union-attr]
        }
        assert self.client.post("/signup", data=data, follow_redirects=False).status_code == 303
        meta = META_TOKEN.search(self.client.get("/account").text)
        assert meta
        self.headers = {"X-CSRF-Token": meta.group(1)}

    def comment(self, slug: str, **fields: Any) -> Any:
        return self.client.post(
            f"/api/visualizations/{slug}/annotations", json=fields, headers=self.headers
        )

    def edit(self, annotation_id: int, body: str) -> Any:
        return self.client.patch(
            f"/api/annotations/{annotation_id}", json={"body": body}, headers=self.headers
        )

    def delete(self, annotation_id: int) -> Any:
        return self.client.delete(f"/api/annotations/{annotation_id}", headers=self.headers)

    def listing(self, slug: str, **query: Any) -> list[dict[str, Any]]:
        response = self.client.get(f"/api/visualizations/{slug}/annotations", params=query)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()
        return rows


def make_artefact(
    session: Session, owner: str | None = None, visibility: str = "public", params: Any = None
) -> str:
    artefact = create_artefact(
        session,
        kind="attention",
        model_name="tiny-gpt2",
        input_text="The cat sat on it",
        params=PARAMS if params is None else params,
        arrays={"attention": np.zeros((2, 4, 5, 5), dtype=np.float32)},
        owner=owner,
        visibility=visibility,
    )
    return artefact.slug


def artefact(app: FastAPI, **kwargs: Any) -> str:
    with app.state.session_factory() as session:
        return make_artefact(session, **kwargs)


def test_threads_are_listed_in_reading_order_for_anyone(app: FastAPI) -> None:
    ada, bob = Browser(app, "ada"), Browser(app, "bob")
    slug = artefact(app)
    root = ada.comment(slug, body="Head 2 copies the previous token", layer=1, head=2).json()
    other = bob.comment(slug, body="Whole-view remark").json()
    reply = bob.comment(slug, body="Agreed", parent_id=root["id"])
    assert reply.status_code == 201
    assert reply.json()["layer"] == 1 and reply.json()["head"] == 2  # the thread's anchor
    nested = ada.comment(slug, body="Thanks", parent_id=reply.json()["id"]).json()
    rows = TestClient(app).get(f"/api/visualizations/{slug}/annotations").json()
    assert [(r["id"], r["depth"]) for r in rows] == [
        (root["id"], 0),
        (reply.json()["id"], 1),
        (nested["id"], 2),
        (other["id"], 0),
    ]
    assert [r["author"] for r in rows] == ["ada", "bob", "ada", "bob"]
    assert not any(r["can_edit"] for r in rows)  # anonymous
    assert [r["can_edit"] for r in ada.listing(slug)] == [True, False, True, False]
    assert [r["id"] for r in ada.listing(slug, layer=1, head=2)] == [
        root["id"],
        reply.json()["id"],
        nested["id"],
    ]


def test_a_comment_keeps_its_anchor_and_token_range(app: FastAPI) -> None:
    ada = Browser(app, "ada")
    slug = artefact(app)
    created = ada.comment(
        slug, body="x", stack="decoder", layer=0, head=3, token_start=1, token_end=4
    ).json()
    expected = {"stack": "decoder", "layer": 0, "head": 3, "token_start": 1, "token_end": 4}
    assert {key: created[key] for key in expected} == expected
    assert created["deleted"] is False and created["parent_id"] is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layer": 2}, "layer 2 does not exist"),
        ({"layer": 0, "head": 4}, "head 4 does not exist"),
        ({"head": 1}, "needs its layer"),
        ({"token_start": 0, "token_end": 5}, "token_end 5 does not exist"),
        ({"token_start": 3, "token_end": 1}, "must not come after"),
        ({"token_start": 1}, "both token_start and token_end"),
        ({"stack": "<script>"}, "stack is 1 to 16"),
        ({"body": "   "}, "needs some text"),
        ({"body": "a\x00b"}, "NUL"),
    ],
)
def test_anchors_outside_the_visualization_are_422(
    app: FastAPI, fields: dict[str, Any], message: str
) -> None:
    ada = Browser(app, "ada")
    slug = artefact(app)
    response = ada.comment(slug, **{"body": "x", **fields})
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert ada.listing(slug) == []


@pytest.mark.parametrize(
    "fields",
    [{"layer": -1}, {"body": ""}, {"body": "x" * 5001}, {"stack": "x" * 17}, {"colour": "red"}],
)
def test_malformed_comments_are_422(app: FastAPI, fields: dict[str, Any]) -> None:
    ada = Browser(app, "ada")
    assert ada.comment(artefact(app), **{"body": "x", **fields}).status_code == 422


def test_anchors_are_free_when_the_visualization_has_no_sizes(app: FastAPI) -> None:
    ada = Browser(app, "ada")
    slug = artefact(app, params={})
    assert ada.comment(slug, body="x", layer=99, head=99).status_code == 201


def test_replies_share_their_threads_anchor_and_stay_on_its_visualization(app: FastAPI) -> None:
    ada = Browser(app, "ada")
    slug, elsewhere = artefact(app), artefact(app)
    root = ada.comment(slug, body="root", layer=1).json()
    moved = ada.comment(slug, body="reply", parent_id=root["id"], layer=0)
    assert moved.status_code == 422 and "thread's anchor" in moved.json()["detail"]
    assert ada.comment(slug, body="ok", parent_id=root["id"], layer=1).status_code == 201
    foreign = ada.comment(elsewhere, body="reply", parent_id=root["id"])
    assert foreign.status_code == 422
    assert ada.comment(slug, body="reply", parent_id=10**6).status_code == 422


def test_bodies_come_back_verbatim_as_json(app: FastAPI) -> None:
    ada = Browser(app, "ada")
    slug = artefact(app)
    body = '<script>alert("x")</script> & <b>bold</b>'
    created = ada.comment(slug, body=body)
    assert created.headers["content-type"] == "application/json"
    assert created.json()["body"] == body
    assert ada.listing(slug)[0]["body"] == body


def test_authors_edit_their_own_comments_only(app: FastAPI) -> None:
    ada, bob = Browser(app, "ada"), Browser(app, "bob")
    slug = artefact(app)
    created = ada.comment(slug, body="first").json()
    edited = ada.edit(created["id"], "second")
    assert edited.status_code == 200
    assert edited.json()["body"] == "second"
    updated, made = (
        datetime.fromisoformat(t) for t in (edited.json()["updated_at"], created["updated_at"])
    )
    assert updated >= made
    refused = bob.edit(created["id"], "vandalised")
    assert refused.status_code == 403 and "author" in refused.json()["detail"]
    assert bob.delete(created["id"]).status_code == 403
    assert ada.edit(10**6, "x").status_code == 404
    assert ada.edit(created["id"], "").status_code == 422
    assert ada.listing(slug)[0]["body"] == "second"


def test_deleting_keeps_a_placeholder_only_while_replies_remain(app: FastAPI) -> None:
    ada, bob = Browser(app, "ada"), Browser(app, "bob")
    slug = artefact(app)
    root = ada.comment(slug, body="root").json()
    reply = bob.comment(slug, body="reply", parent_id=root["id"]).json()
    lonely = ada.comment(slug, body="lonely").json()
    assert ada.delete(lonely["id"]).status_code == 204
    assert ada.delete(root["id"]).status_code == 204
    rows = ada.listing(slug)
    assert [r["id"] for r in rows] == [root["id"], reply["id"]]
    placeholder = rows[0]
    assert placeholder["deleted"] is True
    assert placeholder["body"] == "" and placeholder["author"] is None
    assert placeholder["can_edit"] is False
    assert ada.edit(root["id"], "back").status_code == 404
    assert ada.delete(root["id"]).status_code == 404
    assert bob.comment(slug, body="x", parent_id=root["id"]).status_code == 422
    assert bob.delete(reply["id"]).status_code == 204
    assert ada.listing(slug) == []  # the placeholder went with its last reply


def test_writing_needs_a_login_and_the_csrf_header(app: FastAPI) -> None:
    ada = Browser(app, "ada")
    slug = artefact(app)
    anonymous = TestClient(app).post(f"/api/visualizations/{slug}/annotations", json={"body": "x"})
    assert anonymous.status_code == 401
    assert anonymous.json() == {"detail": "Log in or send an API token.", "error": "Unauthorized"}
    path = f"/api/visualizations/{slug}/annotations"
    assert ada.client.post(path, json={"body": "x"}).status_code == 403
    created = ada.comment(slug, body="x").json()
    assert (
        ada.client.patch(f"/api/annotations/{created['id']}", json={"body": "y"}).status_code == 403
    )
    assert ada.client.delete(f"/api/annotations/{created['id']}").status_code == 403


def test_api_tokens_write_without_csrf(app: FastAPI) -> None:
    ada = Browser(app, "ada")
    token = ada.client.post("/api/tokens", json={"name": "script"}, headers=ada.headers).json()
    script = TestClient(app, headers={"Authorization": f"Bearer {token['token']}"})
    slug = artefact(app)
    created = script.post(f"/api/visualizations/{slug}/annotations", json={"body": "from a script"})
    assert created.status_code == 201 and created.json()["author"] == "ada"
    assert script.delete(f"/api/annotations/{created.json()['id']}").status_code == 204


def test_comments_on_private_visualizations_are_the_owners_alone(app: FastAPI) -> None:
    ada, bob = Browser(app, "ada"), Browser(app, "bob")
    private = artefact(app, owner="ada", visibility="private")
    assert ada.comment(private, body="note to self").status_code == 201
    assert ada.listing(private)[0]["body"] == "note to self"
    path = f"/api/visualizations/{private}/annotations"
    for client in (bob.client, TestClient(app)):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["detail"] == "No visualization at this link."
    assert bob.comment(private, body="x").status_code == 404
    assert TestClient(app).get("/api/visualizations/nope/annotations").status_code == 404


def test_a_visualization_made_private_hides_its_comments_from_their_authors(
    app: FastAPI,
) -> None:
    ada, bob = Browser(app, "ada"), Browser(app, "bob")
    slug = artefact(app, owner="ada", visibility="public")
    comment = bob.comment(slug, body="visible for now").json()
    with app.state.session_factory() as session:
        row = get_artefact(session, slug)
        assert row is not None
        row.visibility = "private"
        session.commit()
    assert bob.edit(comment["id"], "x").status_code == 404
    assert bob.delete(comment["id"]).status_code == 404
    assert [r["author"] for r in ada.listing(slug)] == ["bob"]


# --- store level ---------------------------------------------------------------------


def test_store_deletes_comments_with_their_visualization(session: Session) -> None:
    ada = create_user(session, username="ada", password_hash="x")
    slug = make_artefact(session)
    target = get_artefact(session, slug)
    assert target is not None
    root = create_annotation(session, target, ada, "root", anchor=Anchor(layer=1))
    create_annotation(session, target, ada, "reply", parent_id=root.id)
    assert delete_artefact(session, slug)
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(Annotation)) == 0


def test_store_prunes_chains_of_placeholders(session: Session) -> None:
    ada = create_user(session, username="ada", password_hash="x")
    target = get_artefact(session, make_artefact(session))
    assert target is not None
    first = create_annotation(session, target, ada, "1")
    second = create_annotation(session, target, ada, "2", parent_id=first.id)
    third = create_annotation(session, target, ada, "3", parent_id=second.id)
    assert delete_annotation(session, first) is True
    assert delete_annotation(session, second) is True
    assert [t.annotation.deleted for t in list_annotations(session, target)] == [True, True, False]
    assert delete_annotation(session, third) is False
    assert list_annotations(session, target) == []
    with pytest.raises(AnnotationError):
        create_annotation(session, target, ada, "x", anchor=Anchor(layer=5))


def test_thread_order_survives_very_deep_threads() -> None:
    chain = [Annotation(id=i, parent_id=i - 1 if i else None) for i in range(5000)]
    ordered = thread_order(chain)
    assert [t.depth for t in ordered] == list(range(5000))
