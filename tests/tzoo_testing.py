"""Helpers the tests import (conftest modules are not importable by name)."""

from __future__ import annotations

from pathlib import Path

from tzoo.config import Settings


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings rooted in ``tmp_path`` with any overrides."""
    values: dict[str, object] = {"data_dir": tmp_path / "data", "cache_dir": tmp_path / "cache"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
