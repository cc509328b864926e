"""Store fixtures over every database backend: SQLite always, PostgreSQL when configured.

PostgreSQL tests run against ``TZOO_TEST_DATABASE_URL`` (e.g.
``postgresql://postgres@127.0.0.1:5432/test``), each in a schema of its own that is
dropped afterwards, so parallel and earlier runs never see each other's rows. Without the
variable they skip, except on CI (``CI=true``), where a missing database is a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session

from tzoo.config import normalise_database_url
from tzoo.store import create_engine_for, run_migrations, session_factory

POSTGRES_URL_VARIABLE = "TZOO_TEST_DATABASE_URL"


def postgres_base_url() -> str:
    """The configured test server's URL; skip (or fail on CI) when there is none."""
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if url:
        return normalise_database_url(url)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{POSTGRES_URL_VARIABLE} must be set on CI: PostgreSQL tests may not skip")
    pytest.skip(
        f"PostgreSQL tests need {POSTGRES_URL_VARIABLE}, "
        "e.g. postgresql://postgres@127.0.0.1:5432/test"
    )


@pytest.fixture
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections use a fresh, empty schema (via search_path)."""
    base_url = postgres_base_url()
    schema = f"tzoo_test_{secrets.token_hex(6)}"
    admin = create_engine_for(base_url)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as error:
        admin.dispose()
        pytest.fail(f"cannot use PostgreSQL at {POSTGRES_URL_VARIABLE}: {error}")
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend, not yet migrated."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'tzoo.sqlite3'}"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated engine on each backend."""
    engine = create_engine_for(database_url)
    run_migrations(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session
