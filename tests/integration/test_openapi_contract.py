"""The API keeps its OpenAPI contract under a fuzzer: schemathesis generates requests for
every operation from the app's own schema (examples, boundary and invalid values of the
coverage phase, random ones of the fuzzing phase) and checks each answer.

Zero server errors (a 503 is allowed where the operation documents it), every status,
content type, header and body as documented, invalid input refused with a 4xx (``layer:
true`` is no integer), and undocumented methods answered 405 with a true ``Allow``. Run
once anonymously and once with a personal API token.

Models: the bundled real ones are over TZOO_MAX_MODEL_SIZE_MB here, so a request naming
one is refused (413) before any weights load; nothing heavy runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from tzoo_testing import make_settings

from tzoo.store.accounts import create_api_token, create_user
from tzoo.store.db import run_migrations
from tzoo.web.app import create_app

pytestmark = pytest.mark.slow

# Every check schemathesis has that applies to this API (no security schemes: no
# ignored_auth; no links: the stateful checks have nothing to follow).
CHECKS = {
    "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
    "status_code_conformance": {},
    "content_type_conformance": {},
    "response_schema_conformance": {},
    "response_headers_conformance": {},
    "negative_data_rejection": {},
    "missing_required_header": {},
    "unsupported_method": {},
    "allow_header_conformance": {},
}


def _config(headers: dict[str, str]) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 12,
            "cache": {"enabled": False},  # no .schemathesis/ folder in the working tree
            "headers": headers,
            "generation": {"mode": "all", "max-examples": 12, "deterministic": True},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "checks": {
                "enabled": False,
                **{name: {"enabled": True, **o} for name, o in CHECKS.items()},
            },
        }
    )


def _app(root: Path, model_cache: Path) -> FastAPI:
    # The lens service's only group is a tiny model, so queued lens requests run in
    # milliseconds; a switch to a bundled group is an unknown group.
    groups = root / "groups.json"
    groups.write_text(
        json.dumps(
            {
                "default_group": "tiny",
                "groups": [{"name": "tiny", "model": "tiny-llama", "verbalize_layer": 1}],
            }
        )
    )
    settings_ = make_settings(
        root,
        cache_dir=model_cache,  # converted real models, shared: sized without loading
        model_groups_file=groups,
        lazy_load_model=True,
        hub_offline=True,
        # Every bundled real model is larger: a request for one is a quick 413.
        max_model_size_mb=16,
        rate_limit_per_minute=100_000,
        visualizations_per_minute=100_000,
    )
    return create_app(settings_)


def _token(app: FastAPI) -> str:
    run_migrations(app.state.engine)
    with app.state.session_factory() as session:
        user = create_user(session, username="fuzzer", password_hash="x")
        _, token = create_api_token(session, user, "schemathesis")
    return token


def _run(schema: schemathesis.schemas.BaseSchema) -> tuple[list[str], int]:
    """Run every phase over every operation, as the CLI does; the failures found (one
    line each, with the request that shows it) and how many requests were checked."""
    found: dict[tuple[str, str, str], str] = {}
    checked = 0
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for nodes in event.recorder.checks.values():
                checked += 1
                for node in nodes:
                    info = node.failure_info
                    if info is None:
                        continue
                    failure = info.failure
                    key = (event.recorder.label, node.name, failure.title)
                    found.setdefault(key, f"{failure.message[:300]}\n    {info.code_sample}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            found[(event.label if hasattr(event, "label") else "run", "error", "")] = str(
                event.info.format() if hasattr(event.info, "format") else event.info
            )[:2000]
    lines = [
        f"{label} [{check}] {title}: {detail}" for (label, check, title), detail in found.items()
    ]
    return lines, checked


@pytest.mark.parametrize("who", ["anonymous", "token"])
def test_every_operation_keeps_its_contract(
    who: str, tmp_path: Path, real_model_cache: Path
) -> None:
    app = _app(tmp_path, real_model_cache)
    headers = {"Authorization": f"Bearer {_token(app)}"} if who == "token" else {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_config(headers))
    failures, checked = _run(schema)
    assert checked > 300  # every operation, many requests each
    assert not failures, f"{len(failures)} contract failures:\n" + "\n".join(failures)
