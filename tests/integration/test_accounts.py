"""Accounts over the real app: sign up, log in/out, CSRF, API tokens, visibility rules.

The app runs on each database backend (SQLite always, PostgreSQL when configured), with a
cheap argon2 setting so that hashing does not dominate the run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tzoo_testing import FORM_TOKEN, META_TOKEN, PASSWORD, form_token, make_settings

from tzoo.store import (
    ApiToken,
    LoginSession,
    User,
    UsernameTakenError,
    create_artefact,
    create_user,
)
from tzoo.web import security
from tzoo.web.access import can_view, owned_artefact, visible_artefact
from tzoo.web.app import create_app

pytestmark = pytest.mark.usefixtures("cheap_passwords")


@pytest.fixture
def app(tmp_path: Path, database_url: str) -> FastAPI:
    return create_app(make_settings(tmp_path, database_url=database_url))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:  # runs the lifespan: migrations
        yield test_client


def meta_token(client: TestClient) -> str:
    match = META_TOKEN.search(client.get("/account").text)
    assert match, "no csrf-token meta tag"
    return match.group(1)


def signup(client: TestClient, username: str, password: str = PASSWORD) -> None:
    data = {
        "username": username,
        "password": password,
        "password_confirm": password,
        "csrf_token": form_token(client, "/signup"),
    }
    response = client.post("/signup", data=data, follow_redirects=False)
    assert response.status_code == 303, response.text


def login(client: TestClient, username: str, password: str = PASSWORD, **extra: str) -> Any:
    data = {"username": username, "password": password, "csrf_token": form_token(client), **extra}
    return client.post("/login", data=data, follow_redirects=False)


def db(app: FastAPI) -> Session:
    session: Session = app.state.session_factory()
    return session


# --- sign up, log in, log out ---------------------------------------------------------


def test_signup_logs_in_with_a_safe_cookie_and_the_nav_shows_the_user(client: TestClient) -> None:
    page = client.get("/signup")
    data = {
        "username": "Ada",
        "password": PASSWORD,
        "password_confirm": PASSWORD,
        "csrf_token": FORM_TOKEN.search(page.text).group(1),  # type: ignore[union-attr]
    }
    response = client.post("/signup", data=data, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = next(c for c in response.headers.get_list("set-cookie") if "tzoo_session=" in c)
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # development over http
    assert client.get("/api/me").json() == {"username": "ada"}
    home = client.get("/").text
    assert 'id="nav-user">ada<' in home and 'action="/logout"' in home
    assert META_TOKEN.search(home)


def test_session_cookie_is_secure_when_configured(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, session_cookie_secure=True)
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        page = client.get("/signup")
        assert "Secure" in page.headers["set-cookie"]
        data = {
            "username": "ada",
            "password": PASSWORD,
            "password_confirm": PASSWORD,
            "csrf_token": FORM_TOKEN.search(page.text).group(1),  # type: ignore[union-attr]
        }
        response = client.post("/signup", data=data, follow_redirects=False)
    assert response.status_code == 303
    assert all("Secure" in c for c in response.headers.get_list("set-cookie"))


def test_only_an_argon2_hash_is_stored_and_it_is_upgraded_on_login(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    signup(client, "ada")
    with db(app) as session:
        old_hash = session.scalars(select(User.password_hash)).one()
    assert old_hash.startswith("$argon2id$") and PASSWORD not in old_hash
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    monkeypatch.setattr(security, "PASSWORD_HASHER", stronger)
    client.cookies.clear()
    assert login(client, "ada").status_code == 303
    with db(app) as session:
        new_hash = session.scalars(select(User.password_hash)).one()
    assert new_hash != old_hash and "t=2" in new_hash
    assert not stronger.check_needs_rehash(new_hash)


def test_logout_deletes_the_session_so_the_old_cookie_stops_working(
    app: FastAPI, client: TestClient
) -> None:
    signup(client, "ada")
    old_cookie = client.cookies["tzoo_session"]
    response = client.post(
        "/logout", data={"csrf_token": meta_token(client)}, follow_redirects=False
    )
    assert response.status_code == 303
    assert 'tzoo_session=""' in response.headers["set-cookie"]
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert client.get("/api/me").status_code == 401
    with db(app) as session:
        assert session.scalars(select(LoginSession)).all() == []
    replay = TestClient(app, cookies={"tzoo_session": old_cookie})
    assert replay.get("/api/me").status_code == 401


def test_logout_without_the_csrf_token_is_refused(client: TestClient) -> None:
    signup(client, "ada")
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert client.post("/logout", data={"csrf_token": "nope"}).status_code == 403
    assert client.get("/api/me").json() == {"username": "ada"}


def test_login_failures_say_the_same_thing_for_unknown_users(client: TestClient) -> None:
    signup(client, "ada")
    client.cookies.clear()
    wrong_password = login(client, "ada", "wrong password")
    unknown_user = login(client, "nobody", PASSWORD)
    assert wrong_password.status_code == unknown_user.status_code == 401
    assert "Wrong username or password." in wrong_password.text
    assert "Wrong username or password." in unknown_user.text
    assert login(client, "ADA").status_code == 303  # usernames are case-insensitive


def test_expired_sessions_do_not_authenticate(app: FastAPI, client: TestClient) -> None:
    signup(client, "ada")
    with db(app) as session:
        session.execute(update(LoginSession).values(expires_at=datetime.now(UTC) - timedelta(1)))
        session.commit()
    assert client.get("/api/me").status_code == 401


@pytest.mark.parametrize(
    ("username", "password", "confirm", "status", "message"),
    [
        ("a", PASSWORD, PASSWORD, 400, "3 to 32 characters"),
        ("ada lovelace", PASSWORD, PASSWORD, 400, "3 to 32 characters"),
        ("<b>x</b>", PASSWORD, PASSWORD, 400, "3 to 32 characters"),
        ("ada", "short", "short", 400, "8 to 256 characters"),
        ("ada", PASSWORD, PASSWORD + "!", 400, "differ"),
    ],
)
def test_signup_refuses_bad_input_with_a_message(
    client: TestClient, username: str, password: str, confirm: str, status: int, message: str
) -> None:
    data = {
        "username": username,
        "password": password,
        "password_confirm": confirm,
        "csrf_token": form_token(client, "/signup"),
    }
    response = client.post("/signup", data=data)
    assert response.status_code == status
    assert message in response.text
    assert "<b>x</b>" not in response.text  # the typed username comes back escaped
    assert client.get("/api/me").status_code == 401


def test_a_taken_username_is_409_whatever_its_case(client: TestClient) -> None:
    signup(client, "ada")
    client.cookies.clear()
    data = {
        "username": "ADA",
        "password": PASSWORD,
        "password_confirm": PASSWORD,
        "csrf_token": form_token(client, "/signup"),
    }
    response = client.post("/signup", data=data)
    assert response.status_code == 409 and "taken" in response.text


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/x", "//evil.example/x", "/\\evil.example", "javascript:alert(1)"],
)
def test_login_never_redirects_off_site(client: TestClient, target: str) -> None:
    signup(client, "ada")
    client.cookies.clear()
    response = login(client, "ada", next=target)
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_login_goes_back_to_a_local_next_path(client: TestClient) -> None:
    signup(client, "ada")
    client.cookies.clear()
    response = login(client, "ada", next="/viz/abc?view=head")
    assert response.headers["location"] == "/viz/abc?view=head"


def test_repeated_login_failures_are_429_even_with_the_right_password(
    client: TestClient,
) -> None:
    signup(client, "ada")
    client.cookies.clear()
    for _ in range(10):
        assert login(client, "ada", "wrong password").status_code == 401
    blocked = login(client, "ada")
    assert blocked.status_code == 429
    assert int(blocked.headers["Retry-After"]) > 0
    assert "Too many failed attempts" in blocked.text
    assert login(client, "bob", "wrong password").status_code == 401  # other keys unaffected


# --- CSRF ----------------------------------------------------------------------------


def test_anonymous_form_posts_need_the_signed_csrf_token(client: TestClient) -> None:
    signup(client, "ada")
    client.cookies.clear()
    data = {"username": "ada", "password": PASSWORD}
    assert client.post("/login", data=data).status_code == 403
    token = form_token(client)
    assert client.post("/login", data={**data, "csrf_token": token + "x"}).status_code == 403
    # The same token with a cookie this server did not sign is refused too.
    forged = TestClient(client.app, cookies={"tzoo_csrf": token + ".00"})
    refused = forged.post("/login", data={**data, "csrf_token": token})
    assert refused.status_code == 403 and "reload the page" in refused.text
    accepted = client.post("/login", data={**data, "csrf_token": token}, follow_redirects=False)
    assert accepted.status_code == 303


def test_json_calls_with_the_cookie_need_the_csrf_header(client: TestClient) -> None:
    signup(client, "ada")
    assert client.post("/api/tokens", json={"name": "laptop"}).status_code == 403
    wrong = client.post("/api/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "nope"})
    assert wrong.status_code == 403 and "X-CSRF-Token" in wrong.json()["detail"]
    # JSON without a content type (which a cross-site page can send) is no way around it.
    bare = client.post("/api/tokens", content=b'{"name": "x"}')
    assert bare.status_code == 403
    created = client.post(
        "/api/tokens", json={"name": "laptop"}, headers={"X-CSRF-Token": meta_token(client)}
    )
    assert created.status_code == 201


# --- API tokens ----------------------------------------------------------------------


def create_token(client: TestClient, name: str = "laptop") -> dict[str, object]:
    response = client.post(
        "/api/tokens", json={"name": name}, headers={"X-CSRF-Token": meta_token(client)}
    )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def test_an_api_token_is_shown_once_and_only_its_hash_is_stored(
    app: FastAPI, client: TestClient
) -> None:
    signup(client, "ada")
    created = create_token(client)
    token = str(created["token"])
    assert token.startswith("tzoo_") and len(token) >= 40
    assert token.startswith(str(created["prefix"]))
    listed = client.get("/api/tokens").json()
    assert [row["name"] for row in listed] == ["laptop"]
    assert "token" not in listed[0] and token not in str(listed)
    assert token not in client.get("/account").text
    with db(app) as session:
        row = session.scalars(select(ApiToken)).one()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (row.name, row.prefix, row.token_hash)


def test_bearer_tokens_need_no_csrf_and_stop_working_once_revoked(
    app: FastAPI, client: TestClient
) -> None:
    signup(client, "ada")
    first, second = create_token(client, "one"), create_token(client, "two")
    script = TestClient(app, headers={"Authorization": f"Bearer {first['token']}"})
    assert script.get("/api/me").json() == {"username": "ada"}
    assert script.delete(f"/api/tokens/{second['id']}").status_code == 204  # no CSRF header
    refused = script.post("/api/tokens", json={"name": "more"})
    assert refused.status_code == 403 and "browser session" in refused.json()["detail"]
    assert (
        client.delete(
            f"/api/tokens/{first['id']}", headers={"X-CSRF-Token": meta_token(client)}
        ).status_code
        == 204
    )
    revoked = script.get("/api/me")
    assert revoked.status_code == 401
    assert revoked.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_mistyped_bearer_token_is_401_not_anonymous(app: FastAPI, client: TestClient) -> None:
    for header in ("Bearer tzoo_not-a-token", "Bearer ", "bearer something"):
        response = TestClient(app, headers={"Authorization": header}).get("/health")
        assert response.status_code == 200  # routes that do not ask who you are still work
        response = TestClient(app, headers={"Authorization": header}).get("/api/me")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_api_needs_a_login_and_says_so(client: TestClient) -> None:
    for method, path in (("GET", "/api/me"), ("GET", "/api/tokens"), ("POST", "/api/tokens")):
        response = client.request(method, path, json={"name": "x"})
        assert response.status_code == 401
        assert response.json() == {
            "detail": "Log in or send an API token.",
            "error": "Unauthorized",
        }


def test_nobody_can_revoke_someone_elses_token(app: FastAPI, client: TestClient) -> None:
    signup(client, "ada")
    token_id = create_token(client)["id"]
    other = TestClient(app)
    signup(other, "bob")
    response = other.delete(f"/api/tokens/{token_id}", headers={"X-CSRF-Token": meta_token(other)})
    assert response.status_code == 404
    assert len(client.get("/api/tokens").json()) == 1


def test_account_page_creates_shows_once_and_revokes_tokens(client: TestClient) -> None:
    anonymous = client.get("/account", follow_redirects=False)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/login?next=%2Faccount"
    signup(client, "ada")
    token = form_token(client, "/account")
    created = client.post(
        "/account/tokens", data={"name": "<script>x</script>", "csrf_token": token}
    )
    assert created.status_code == 200
    shown = re.search(r'id="new-token-value"[^>]*>([^<]+)<', created.text)
    assert shown and shown.group(1).startswith("tzoo_")
    assert "<script>x</script>" not in created.text
    assert "&lt;script&gt;x&lt;/script&gt;" in created.text
    assert client.post("/account/tokens", data={"name": "x"}).status_code == 403
    token_id = client.get("/api/tokens").json()[0]["id"]
    revoked = client.post(
        f"/account/tokens/{token_id}/revoke", data={"csrf_token": token}, follow_redirects=False
    )
    assert revoked.status_code == 303
    assert client.get("/api/tokens").json() == []


# --- who sees what -------------------------------------------------------------------


def make_artefact(session: Session, owner: str | None, visibility: str) -> str:
    artefact = create_artefact(
        session,
        kind="attention",
        model_name="tiny-gpt2",
        input_text="The cat sat",
        params={},
        arrays={"attention": np.zeros((1, 1, 2, 2), dtype=np.float32)},
        owner=owner,
        visibility=visibility,
    )
    return artefact.slug


def test_private_artefacts_are_404_for_everyone_but_the_owner(session: Session) -> None:
    ada = create_user(session, username="Ada", password_hash="x")
    bob = create_user(session, username="bob", password_hash="x")
    private = make_artefact(session, "ada", "private")
    public = make_artefact(session, "ada", "public")
    assert visible_artefact(session, private, ada).slug == private
    assert owned_artefact(session, private, ada).slug == private
    for viewer in (bob, None):
        for check in (visible_artefact, owned_artefact):
            with pytest.raises(HTTPException) as raised:
                check(session, private, viewer)
            assert raised.value.status_code == 404
            assert raised.value.detail == "No visualization at this link."
        assert visible_artefact(session, public, viewer).slug == public
        with pytest.raises(HTTPException) as raised:
            owned_artefact(session, public, viewer)
        assert raised.value.status_code == 403
    with pytest.raises(HTTPException) as raised:
        visible_artefact(session, "nonexistent", ada)
    assert raised.value.status_code == 404
    unlisted = visible_artefact(session, make_artefact(session, None, "unlisted"), None)
    assert can_view(unlisted, None) and not can_view(visible_artefact(session, private, ada), bob)


def test_usernames_are_unique_whatever_their_case(session: Session) -> None:
    create_user(session, username="ada", password_hash="x")
    with pytest.raises(UsernameTakenError):
        create_user(session, username=" ADA ", password_hash="y")
