"""Engines, sessions and schema upgrades for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from tzoo.config import normalise_database_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Key of the PostgreSQL advisory lock that serialises upgrades between processes
# (any constant works; this is "tzoo" in ASCII).
_MIGRATION_LOCK_KEY = 0x747A6F6F
_SQLITE_BUSY_TIMEOUT_MS = 10_000


def create_engine_for(url: str, **engine_kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings each backend needs to serve a web app.

    SQLite: the file's folder is created, connections may cross threads (FastAPI runs sync
    routes in a thread pool), and WAL lets readers proceed while one writer writes.
    PostgreSQL: stale pooled connections are replaced rather than failing a request.
    """
    url = normalise_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, parsed.database, **engine_kwargs)
    engine_kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **engine_kwargs)


def _create_sqlite_engine(url: str, database: str | None, **engine_kwargs: Any) -> Engine:
    in_memory = not database or database == ":memory:" or database.startswith("file::memory:")
    connect_args = {"check_same_thread": False, **engine_kwargs.pop("connect_args", {})}
    if in_memory:
        # One shared connection, otherwise each new connection sees an empty database.
        engine_kwargs.setdefault("poolclass", StaticPool)
    else:
        assert database is not None
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args=connect_args, **engine_kwargs)

    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection: sqlite3.Connection, _: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                _enable_wal(cursor)
        finally:
            cursor.close()

    return engine


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Switch the file to WAL. The switch needs an exclusive lock and SQLite may answer
    BUSY at once, without its busy handler, while another process holds the file (seen
    when several processes migrate at the same moment); WAL is a persistent property of
    the file, so whichever connection wins sets it for all, and losing is harmless."""
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc).lower():
            raise


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit, so routes can still read them."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config() -> Config:
    """An Alembic config built in code, pointing at the migrations inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def run_migrations(engine_or_url: Engine | str) -> None:
    """Upgrade the schema to the latest revision; a no-op when it is already there.

    Safe when several processes start at once: on PostgreSQL the upgrade runs inside one
    transaction holding an advisory lock, on SQLite inside ``BEGIN IMMEDIATE``; a second
    process waits, then finds the schema at head and does nothing.
    """
    if isinstance(engine_or_url, str):
        engine = create_engine_for(engine_or_url)
        try:
            _upgrade(engine)
        finally:
            engine.dispose()
    else:
        _upgrade(engine_or_url)


def _upgrade(engine: Engine) -> None:
    config = alembic_config()
    with engine.connect() as connection:
        _lock_for_migration(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()


def _lock_for_migration(connection: Connection) -> None:
    """Begin the upgrade's transaction holding a lock that other migrators wait on."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        # Transaction-scoped: released by the commit (or rollback) that ends the upgrade.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    elif dialect == "sqlite":
        # pysqlite would only BEGIN at the first write, after Alembic has read the current
        # revision; BEGIN IMMEDIATE takes the write lock before that read.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
