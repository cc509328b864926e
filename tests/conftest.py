"""Fixtures every test shares.

- Data and cache directories point at temporary folders (like ``llm``'s ``env_setup``),
  so no test reads or writes the user's real ones.
- The bundled real models share one cache per test session, so the GGUF conversion of
  smollm2-135m (about 20 s) happens once per run, not once per test.
- The hub is offline: a test that tried to download would fail clearly, never hang.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from tzoo.config import get_settings

    monkeypatch.setenv("TZOO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TZOO_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("TZOO_DATABASE_URL", "TZOO_PRELOAD", "TZOO_DEVICE", "TZOO_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def real_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the bundled real models, shared by the whole session."""
    return tmp_path_factory.mktemp("real-model-cache")


@pytest.fixture(scope="session")
def real_manager(real_model_cache: Path):  # type: ignore[no-untyped-def]
    """A ModelManager over the shared real-model cache (loads each real model once)."""
    from tzoo.config import Settings
    from tzoo.runtime.manager import ModelManager

    settings = Settings(
        cache_dir=real_model_cache, data_dir=real_model_cache / "data", memory_budget_mb=8192
    )
    manager = ModelManager(settings)
    yield manager
    manager.unload_all()


@pytest.fixture
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast argon2 parameters: the real ones take ~50 ms a hash, by design."""
    from argon2 import PasswordHasher

    from tzoo.web import security

    monkeypatch.setattr(
        security, "PASSWORD_HASHER", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )
