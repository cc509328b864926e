from __future__ import annotations

import pytest
from pydantic import ValidationError

from tzoo.config import Settings, normalise_database_url


def test_every_setting_has_a_description() -> None:
    undocumented = [
        name
        for name, field in Settings.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undocumented == []


def test_production_refuses_the_placeholder_secret(tmp_path) -> None:
    with pytest.raises(ValidationError, match="TZOO_SECRET_KEY"):
        Settings(environment="production", data_dir=tmp_path)
    assert Settings(environment="production", secret_key="s3cret", data_dir=tmp_path)


def test_environment_variables_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZOO_PRELOAD", "tiny-gpt2, minilm-l6")
    monkeypatch.setenv("TZOO_MEMORY_BUDGET_MB", "1.5")
    settings = Settings()
    assert settings.preload == ["tiny-gpt2", "minilm-l6"]
    assert settings.memory_budget_bytes == int(1.5 * 2**20)


def test_default_store_is_sqlite_in_data_dir(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path / 'tzoo.sqlite3'}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_urls_use_psycopg3(given: str, expected: str) -> None:
    assert normalise_database_url(given) == expected


def test_json_list_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZOO_ALLOWED_ORIGINS", '["http://a.example", "http://b.example"]')
    assert Settings().allowed_origins == ["http://a.example", "http://b.example"]


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`TZOO_{name.upper()}`" not in readme]
    assert missing == []
