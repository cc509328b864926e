"""The operator (admin) role: granted from the CLI only, carried by an admin account's
session or API token and by the holder of TZOO_API_KEY; everyone else gets a sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from tzoo_testing import PASSWORD, make_settings, signed_up

from tzoo.cli import app as cli
from tzoo.store.accounts import create_api_token, create_user, get_user
from tzoo.web.app import create_app
from tzoo.web.deps import ADMIN_REQUIRED, AdminDep

runner = CliRunner()


def _users(*args: str, password: str | None = PASSWORD) -> tuple[int, str]:
    stdin = None if password is None else password + "\n"
    result = runner.invoke(cli, ["users", *args], input=stdin)
    return result.exit_code, result.output


@pytest.mark.usefixtures("cheap_passwords")
def test_users_cli_creates_operators_and_grants_and_revokes_the_role(tmp_path: Path) -> None:
    code, out = _users("create", "Ada", "--admin", "--password-stdin")
    assert code == 0, out
    assert "'ada', an operator" in out
    code, out = _users("create", "bob", "--password-stdin")
    assert code == 0 and "'bob', a user" in out

    code, out = _users("list", password=None)
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "operator" in rows["ada"] and "user" in rows["bob"]

    assert _users("admin", "bob", password=None)[0] == 0
    assert "operator" in _users("list", password=None)[1].split("bob")[1].splitlines()[0]
    code, out = _users("admin", "bob", "--revoke", password=None)
    assert code == 0 and "no longer an operator" in out


@pytest.mark.usefixtures("cheap_passwords")
def test_users_cli_errors_are_sentences_with_exit_code_2() -> None:
    code, out = _users("create", "carol", "--password-stdin", password="short")
    assert code == 2 and "8 to 256 characters" in out
    code, out = _users("create", "x", "--password-stdin")
    assert code == 2 and "3 to" in out
    assert _users("create", "dave", "--password-stdin")[0] == 0
    code, out = _users("create", "DAVE", "--password-stdin")
    assert code == 2 and "taken" in out
    code, out = _users("admin", "nobody", password=None)
    assert code == 2 and "No account 'nobody'" in out


def _app_with_admin_route(tmp_path: Path, **overrides: object) -> FastAPI:
    app = create_app(make_settings(tmp_path, **overrides))

    @app.post("/api/test-admin-only")
    def admin_only(auth: AdminDep) -> dict[str, object]:
        return {"via": auth.via, "user": auth.user.username if auth.user else None}

    return app


@pytest.mark.usefixtures("cheap_passwords")
def test_only_operators_pass_require_admin(tmp_path: Path) -> None:
    app = _app_with_admin_route(tmp_path, api_key="operator-key-123")
    with TestClient(app) as anonymous:
        response = anonymous.post("/api/test-admin-only")
        assert response.status_code == 401
        assert response.json()["detail"] == ADMIN_REQUIRED

        # A signed-up account is not an operator, whatever it sends.
        with TestClient(app) as browser:
            csrf = signed_up(browser, "mallory")
            response = browser.post("/api/test-admin-only", headers={"X-CSRF-Token": csrf})
            assert response.status_code == 403
            assert "tzoo users create --admin" in response.json()["detail"]

        factory = app.state.session_factory
        with factory() as session:
            create_user(session, username="root", password_hash="x", is_admin=True)
            _, admin_token = create_api_token(session, get_user(session, "root"), "ops")  # type: ignore[arg-type]
            _, user_token = create_api_token(session, get_user(session, "mallory"), "m")  # type: ignore[arg-type]

        bearer = {"Authorization": f"Bearer {admin_token}"}
        response = anonymous.post("/api/test-admin-only", headers=bearer)
        assert response.status_code == 200
        assert response.json() == {"via": "token", "user": "root"}

        bearer = {"Authorization": f"Bearer {user_token}"}
        assert anonymous.post("/api/test-admin-only", headers=bearer).status_code == 403

        # The holder of TZOO_API_KEY is the operator, with no account and no CSRF token.
        bearer = {"Authorization": "Bearer operator-key-123"}
        response = anonymous.post("/api/test-admin-only", headers=bearer)
        assert response.status_code == 200
        assert response.json() == {"via": "api_key", "user": None}

        # A wrong key is not silently anonymous: it is a 401 naming the token.
        bearer = {"Authorization": "Bearer operator-key-124"}
        response = anonymous.post("/api/test-admin-only", headers=bearer)
        assert response.status_code == 401
        assert "not valid" in response.json()["detail"]


@pytest.mark.usefixtures("cheap_passwords")
def test_an_admin_browser_session_needs_its_csrf_token(tmp_path: Path) -> None:
    app = _app_with_admin_route(tmp_path)
    with TestClient(app) as browser:
        csrf = signed_up(browser, "root")
        with app.state.session_factory() as session:
            user = get_user(session, "root")
            assert user is not None
            user.is_admin = True
            session.commit()
        assert browser.post("/api/test-admin-only").status_code == 403
        response = browser.post("/api/test-admin-only", headers={"X-CSRF-Token": csrf})
        assert response.status_code == 200
        assert response.json() == {"via": "session", "user": "root"}


def test_no_api_key_means_no_operator_by_key(tmp_path: Path) -> None:
    app = _app_with_admin_route(tmp_path)  # TZOO_API_KEY unset
    with TestClient(app) as client:
        response = client.post("/api/test-admin-only", headers={"Authorization": "Bearer "})
        assert response.status_code == 401
