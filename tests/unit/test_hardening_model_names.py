"""The pure parts of the web's model hardening: which names read as paths, which paths are
inside TZOO_MODEL_DIRS (decided from the text first), paths scrubbed from messages, and the
linear JSON depth scan of the lens socket."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from tzoo_testing import make_settings

from tzoo.runtime.errors import InvalidModelNameError, UnknownModelError
from tzoo.runtime.manager import ModelManager
from tzoo.service.model_loading import (
    LocalPathRefusedError,
    public_model_label,
    scrub_paths,
    web_model_name,
)
from tzoo.web.routes.lens_service import json_depth_over


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    return ModelManager(make_settings(tmp_path, model_dirs=[tmp_path / "models"]))


def test_names_are_catalogue_names_hub_ids_or_paths_under_model_dirs(
    manager: ModelManager, tmp_path: Path
) -> None:
    settings = manager.settings
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert web_model_name("tiny-gpt2", settings, manager) == "tiny-gpt2"
    assert web_model_name("owner/name", settings, manager) == "owner/name"
    inside = str(tmp_path / "models" / "m")
    assert web_model_name(inside, settings, manager) == str(Path(inside).resolve())
    for refused in ("/etc", "./m", "~/m", "a/b/c", "owner/..", "x\\y", f"{inside}/../../x"):
        with pytest.raises(LocalPathRefusedError):
            web_model_name(refused, settings, manager)
    with pytest.raises(UnknownModelError):
        web_model_name("gpt-17", settings, manager)  # not looked up in the working directory
    with pytest.raises(InvalidModelNameError):
        web_model_name(" ", settings, manager)


def test_refused_paths_are_refused_before_the_file_system_is_asked(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os.path

    def no_lookup(path: Any) -> str:
        raise AssertionError(f"looked up {path}")

    monkeypatch.setattr(os.path, "realpath", no_lookup)
    for outside in ("/etc/passwd", "/no/such/thing", "/"):
        with pytest.raises(LocalPathRefusedError):
            web_model_name(outside, manager.settings, manager)


def test_paths_are_scrubbed_from_messages_and_labels() -> None:
    assert (
        scrub_paths("Cannot load a model from /srv/m/x: bad") == "Cannot load a model from …: bad"
    )
    assert scrub_paths("see https://example.org/a/b and owner/name") == (
        "see https://example.org/a/b and owner/name"
    )
    assert public_model_label("/srv/models/x") == "local directory"
    assert public_model_label("owner/name") == "owner/name"


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_the_depth_scan_agrees_with_the_parser_and_stays_linear() -> None:
    rng = random.Random(12)

    def build(levels: int) -> Any:
        if levels == 0:
            return rng.choice(['"[', "]}", '\\"{', 1, None, "é[\u2028"])
        if rng.random() < 0.5:
            return [build(levels - 1) for _ in range(rng.randint(1, 3))]
        return {rng.choice(["k[", "}", '"']): build(levels - 1)}

    for _ in range(300):
        value = build(rng.randint(0, 7))
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        depth = _depth(value)
        assert not json_depth_over(text, depth)
        assert depth == 0 or json_depth_over(text, depth - 1)

    # Inputs that made a naive string pattern quadratic: each scan stays in milliseconds.
    for hostile in ('"\\' * 30_000, '"' + "[" * 60_000, "\\" * 60_000 + '"', '"a' * 30_000):
        started = time.perf_counter()
        json_depth_over(hostile, 32)
        assert time.perf_counter() - started < 0.5
