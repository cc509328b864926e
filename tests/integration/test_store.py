"""The store on real databases: migrations, artefact CRUD, and arrays surviving the trip."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tzoo.store import (
    Artefact,
    Base,
    alembic_config,
    create_artefact,
    create_engine_for,
    delete_artefact,
    get_artefact,
    list_artefacts,
    load_arrays,
    run_migrations,
    session_factory,
)
from tzoo.store import artefacts as artefacts_module


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def stored_revisions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(text("SELECT version_num FROM alembic_version")))


def attention(layers: int = 2, heads: int = 3, tokens: int = 7, seed: int = 0) -> np.ndarray:
    """Softmax rows, (layers, heads, T, T), float32."""
    scores = np.random.default_rng(seed).normal(size=(layers, heads, tokens, tokens))
    weights = np.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def make(session: Session, **overrides: object) -> Artefact:
    fields: dict[str, object] = {
        "kind": "attention",
        "model_name": "tiny-gpt2",
        "input_text": "The cat sat",
        "params": {"layer": 0},
        "arrays": {"attention": attention()},
    }
    return create_artefact(session, **(fields | overrides))  # type: ignore[arg-type]


# --- migrations ------------------------------------------------------------------------


def test_migrations_are_idempotent(database_url: str) -> None:
    run_migrations(database_url)
    engine = create_engine_for(database_url)
    try:
        run_migrations(engine)
        run_migrations(engine)
        assert stored_revisions(engine) == [head_revision()]
        inspector = inspect(engine)
        assert "artefacts" in inspector.get_table_names()
        indexes = {index["name"]: index for index in inspector.get_indexes("artefacts")}
        assert indexes["ix_artefacts_slug"]["unique"]
        assert {"ix_artefacts_kind", "ix_artefacts_model_name"} <= set(indexes)
    finally:
        engine.dispose()


def test_concurrent_migrations_from_several_processes(database_url: str) -> None:
    script = "import sys; from tzoo.store import run_migrations; run_migrations(sys.argv[1])"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, database_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    engine = create_engine_for(database_url)
    try:
        assert stored_revisions(engine) == [head_revision()]
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


# --- create / get / load ---------------------------------------------------------------


def test_arrays_survive_the_database(engine: Engine) -> None:
    weights = attention(layers=12, heads=12, tokens=50)
    token_ids = np.array([101, 2023, 2003, 102], dtype=np.int64)
    with session_factory(engine)() as session:
        created = make(
            session,
            arrays={"attention": weights, "token_ids": token_ids},
            params={"layers": [0, 1], "nested": {"a": None, "b": 1.5}, "text": "é ✓"},
            owner="ada",
            visibility="unlisted",
        )
        slug = created.slug

    with session_factory(engine)() as session:
        loaded = get_artefact(session, slug)
    assert loaded is not None  # read after the session closed: the blob was loaded eagerly
    arrays = load_arrays(loaded)
    assert set(arrays) == {"attention", "token_ids"}
    assert arrays["attention"].dtype == np.float32
    assert arrays["attention"].shape == (12, 12, 50, 50)
    assert np.all(np.abs(arrays["attention"] - weights) <= np.maximum(weights * 2**-11, 2**-25))
    np.testing.assert_array_equal(arrays["token_ids"], token_ids)
    assert loaded.params == {"layers": [0, 1], "nested": {"a": None, "b": 1.5}, "text": "é ✓"}
    assert (loaded.kind, loaded.model_name, loaded.input_text) == (
        "attention",
        "tiny-gpt2",
        "The cat sat",
    )
    assert (loaded.owner, loaded.visibility) == ("ada", "unlisted")
    assert loaded.blob_bytes == len(loaded.blob) < weights.nbytes / 2


def test_precision_is_honoured(session: Session) -> None:
    weights = attention()
    exact = make(session, arrays={"w": weights}, precision="float32")
    coarse = make(session, arrays={"w": weights}, precision="uint8")
    np.testing.assert_array_equal(load_arrays(exact)["w"], weights)
    scale = (weights.max() - weights.min()) / 255
    assert np.abs(load_arrays(coarse)["w"] - weights).max() <= scale / 2 + 1e-6
    assert coarse.blob_bytes < exact.blob_bytes


def test_created_at_is_aware_utc_and_defaults_apply(session: Session) -> None:
    created = make(session)
    assert created.created_at.tzinfo is not None
    assert created.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - created.created_at) < timedelta(minutes=5)
    assert created.visibility == "public"
    assert created.owner is None
    session.expire_all()
    reloaded = get_artefact(session, created.slug)
    assert reloaded is not None
    assert reloaded.created_at.utcoffset() == timedelta(0)


def test_get_unknown_slug_returns_none(session: Session) -> None:
    assert get_artefact(session, "doesNotExist") is None


# --- slugs -----------------------------------------------------------------------------


def test_slugs_are_unique_and_url_safe(session: Session) -> None:
    slugs = [make(session, arrays={}).slug for _ in range(40)]
    assert len(set(slugs)) == len(slugs)
    for slug in slugs:
        assert 10 <= len(slug) <= 12
        assert slug.isascii() and slug.isalnum()


def test_database_refuses_duplicate_slugs(session: Session) -> None:
    first = make(session)
    session.add(
        Artefact(
            slug=first.slug,
            kind="attention",
            model_name="m",
            input_text="",
            params={},
            blob=b"",
            blob_bytes=0,
        )
    )
    with pytest.raises(IntegrityError):
        session.commit()


def test_taken_slug_is_replaced(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = make(session).slug
    candidates = iter([taken, taken, "FreshSlug01"])
    monkeypatch.setattr(artefacts_module, "new_slug", lambda: next(candidates))
    assert make(session).slug == "FreshSlug01"


def test_slug_taken_by_a_concurrent_writer_is_replaced(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process takes the slug between our check and our insert."""
    candidates = iter(["RacedSlug01", "FreshSlug02"])
    monkeypatch.setattr(artefacts_module, "new_slug", lambda: next(candidates))
    Factory = session_factory(engine)
    with Factory() as session:

        def other_writer_inserts_first(*_: object) -> None:
            with Factory() as other:
                make_raw(other, "RacedSlug01")

        event.listen(session, "before_flush", other_writer_inserts_first, once=True)
        created = make(session)
    assert created.slug == "FreshSlug02"
    with Factory() as session:
        assert {a.slug for a in list_artefacts(session)} == {"RacedSlug01", "FreshSlug02"}


def test_keyed_artefacts_are_found_by_kind_and_key(session: Session) -> None:
    first = make(session, kind="feature_dashboard", lookup_key="k" * 64)
    make(session, kind="other_kind", lookup_key="k" * 64)  # unique per kind only
    make(session)  # no key: never collides with another keyless artefact
    make(session)
    found = artefacts_module.find_artefact(session, "feature_dashboard", "k" * 64)
    assert found is not None and found.slug == first.slug
    assert load_arrays(found).keys() == load_arrays(first).keys()
    assert artefacts_module.find_artefact(session, "feature_dashboard", "nope") is None
    with pytest.raises(ValueError, match="lookup_key"):
        make(session, lookup_key="x" * 65)


def test_a_key_stored_by_a_concurrent_writer_returns_that_artefact(engine: Engine) -> None:
    """Two writers build the same keyed result: the second insert hits the unique index
    and gets the first writer's artefact instead of an error or a duplicate."""
    Factory = session_factory(engine)
    with Factory() as session:

        def other_writer_inserts_first(*_: object) -> None:
            with Factory() as other:
                make(other, kind="feature_dashboard", lookup_key="race", input_text="first")

        event.listen(session, "before_flush", other_writer_inserts_first, once=True)
        got = make(session, kind="feature_dashboard", lookup_key="race", input_text="second")
    assert got.input_text == "first"
    with Factory() as session:
        assert [a.input_text for a in list_artefacts(session, kind="feature_dashboard")] == [
            "first"
        ]


def make_raw(session: Session, slug: str) -> None:
    session.add(
        Artefact(
            slug=slug,
            kind="attention",
            model_name="m",
            input_text="",
            params={},
            blob=b"",
            blob_bytes=0,
        )
    )
    session.commit()


# --- list / delete ---------------------------------------------------------------------


def test_list_filters_orders_and_pages(session: Session) -> None:
    first = make(session, kind="attention", model_name="a")
    second = make(session, kind="logit-lens", model_name="a")
    third = make(session, kind="attention", model_name="b")

    assert [x.slug for x in list_artefacts(session)] == [third.slug, second.slug, first.slug]
    assert [x.slug for x in list_artefacts(session, kind="attention")] == [
        third.slug,
        first.slug,
    ]
    assert [x.slug for x in list_artefacts(session, model_name="a")] == [
        second.slug,
        first.slug,
    ]
    assert [x.slug for x in list_artefacts(session, kind="attention", model_name="b")] == [
        third.slug
    ]
    assert [x.slug for x in list_artefacts(session, limit=1, offset=1)] == [second.slug]
    assert list_artefacts(session, kind="nothing-like-this") == []


def test_list_does_not_load_blobs(session: Session) -> None:
    make(session)
    session.expunge_all()
    (listed,) = list_artefacts(session)
    assert "blob" in inspect(listed).unloaded
    assert load_arrays(listed)["attention"].shape == (2, 3, 7, 7)  # lazy-loads on demand


def test_visibility_filter(session: Session) -> None:
    public = make(session)
    unlisted = make(session, visibility="unlisted")
    private = make(session, visibility="private", owner="ada")

    assert [x.slug for x in list_artefacts(session)] == [public.slug]
    assert [x.slug for x in list_artefacts(session, visibility="unlisted")] == [unlisted.slug]
    assert [x.slug for x in list_artefacts(session, visibility="private")] == [private.slug]
    assert {x.slug for x in list_artefacts(session, visibility=None)} == {
        public.slug,
        unlisted.slug,
        private.slug,
    }
    # Unlisted and private artefacts are still reachable by their permalink.
    assert get_artefact(session, unlisted.slug) is not None


def test_delete(session: Session) -> None:
    kept, doomed = make(session), make(session)
    assert delete_artefact(session, doomed.slug) is True
    assert get_artefact(session, doomed.slug) is None
    assert delete_artefact(session, doomed.slug) is False
    assert [x.slug for x in list_artefacts(session)] == [kept.slug]


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"visibility": "secret"}, "visibility must be one of public, unlisted, private"),
        ({"visibility": ""}, "visibility must be one of"),
        ({"kind": ""}, "kind must be a non-empty string"),
        ({"kind": "   "}, "kind must be a non-empty string"),
        ({"kind": "k" * 65}, "kind must be at most 64 characters"),
        ({"model_name": ""}, "model_name must be 1 to 255 characters"),
        ({"params": {"x": np.float32(1.0)}}, "params must be JSON-serialisable"),
        ({"params": {"x": float("nan")}}, "params must be JSON-serialisable"),
        ({"params": [1, 2]}, "params must be a dict"),
        ({"precision": "int4"}, "precision must be one of"),
        ({"arrays": {"x": np.array([np.nan])}, "precision": "uint8"}, "NaN or Inf"),
    ],
)
def test_invalid_input_is_refused_and_nothing_is_stored(
    session: Session, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make(session, **overrides)
    assert list_artefacts(session, visibility=None) == []


def test_kind_of_64_characters_is_accepted(session: Session) -> None:
    assert make(session, kind="k" * 64).kind == "k" * 64


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"visibility": "everyone"}, "visibility must be one of"),
        ({"limit": 0}, "limit must be between"),
        ({"limit": 10_000}, "limit must be between"),
        ({"offset": -1}, "offset must not be negative"),
    ],
)
def test_invalid_list_arguments(
    session: Session, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        list_artefacts(session, **arguments)  # type: ignore[arg-type]


def test_database_refuses_unknown_visibility(session: Session) -> None:
    """The CHECK constraint guards writers that bypass create_artefact."""
    session.add(
        Artefact(
            slug="BadVisib001",
            kind="attention",
            model_name="m",
            input_text="",
            params={},
            blob=b"",
            blob_bytes=0,
            visibility="secret",
        )
    )
    with pytest.raises(IntegrityError):
        session.commit()


# --- engines ---------------------------------------------------------------------------


def test_sqlite_engine_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "tzoo.sqlite3"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        run_migrations(engine)
        assert path.exists()
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_in_memory_sqlite_keeps_its_schema_across_connections() -> None:
    engine = create_engine_for("sqlite://")
    try:
        run_migrations(engine)
        with session_factory(engine)() as session:
            slug = make(session).slug
        with session_factory(engine)() as session:
            assert get_artefact(session, slug) is not None
    finally:
        engine.dispose()


def test_plain_postgresql_urls_use_psycopg() -> None:
    engine = create_engine_for("postgresql://postgres@127.0.0.1:5432/test")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()
