"""The tzoo command: every command documented, errors as sentences and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tzoo.cli import EXIT_CODES, app

runner = CliRunner()


def _all_commands(group: Any, prefix: str = "") -> dict[str, Any]:
    # Typer vendors its own click, so groups and options are recognised by what they have.
    found: dict[str, Any] = {}
    for name, command in group.commands.items():
        found[prefix + name] = command
        if hasattr(command, "commands"):
            found.update(_all_commands(command, prefix + name + " "))
    return found


def test_every_command_and_option_has_help() -> None:
    commands = _all_commands(get_command(app))
    assert {"serve", "doctor", "models", "models list", "models load", "models convert"} <= set(
        commands
    )
    for name, command in commands.items():
        assert (command.help or "").strip(), f"`tzoo {name}` has no help text"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"`tzoo {name} {param.opts[0]}` has no help"


def test_help_does_not_import_torch() -> None:
    code = "import sys, tzoo.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_list_shows_the_catalogue() -> None:
    result = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-t5"):
        assert name in result.output


def test_models_load_prints_the_summary() -> None:
    result = runner.invoke(app, ["models", "load", "tiny-llama"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "n_kv_heads" in result.output and "decoder" in result.output


def test_unknown_model_exits_with_its_code_and_a_sentence() -> None:
    result = runner.invoke(app, ["models", "load", "gpt-17"], env={"COLUMNS": "200"})
    assert result.exit_code == EXIT_CODES["UnknownModelError"]
    assert "Unknown model 'gpt-17'" in result.output and "Traceback" not in result.output


def test_not_a_model_directory_exits_with_load_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "load", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == EXIT_CODES["ModelLoadError"]
    assert "not a model" in result.output


def test_invalid_name_exits_like_a_load_error() -> None:
    result = runner.invoke(app, ["models", "load", " "], env={"COLUMNS": "200"})
    assert result.exit_code == EXIT_CODES["ModelLoadError"]
    assert "model name is required" in result.output


def test_convert_refuses_a_model_that_is_not_gguf() -> None:
    result = runner.invoke(app, ["models", "convert", "minilm-l6"], env={"COLUMNS": "200"})
    assert result.exit_code == 4 and "not a GGUF model" in result.output


def test_doctor_reports_device_dirs_and_models(tmp_path: Path) -> None:
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cpu" in result.output and str(tmp_path / "cache") in result.output
    assert "smollm2-135m" in result.output


def test_bad_settings_are_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZOO_MEMORY_BUDGET_MB", "-3")
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 1 and "Invalid settings" in result.output


def test_attention_prints_a_summary_of_the_heads() -> None:
    result = runner.invoke(
        app, ["attention", "The cat sat.", "--model", "tiny-gpt2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "decoder: 2 layers x 4 heads" in result.output and "previous_token" in result.output


def test_attention_writes_an_offline_html_file(tmp_path: Path) -> None:
    out = tmp_path / "viz.html"
    args = ["attention", "The cat sat.", "--model", "tiny-bert", "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "tzoo-embedded" in page and "The cat sat." in page
    assert 'src="http' not in page


def test_attention_html_of_t5_holds_its_position_bias(tmp_path: Path) -> None:
    out = tmp_path / "t5.html"
    args = ["attention", "Hello there.", "--model", "tiny-t5", "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert '"position_bias":{"encoder":{"shape":[4,' in page
    assert '"has_position_bias":true' in page


def test_attention_share_stores_it_and_prints_the_link(tmp_path: Path) -> None:
    from tzoo.config import Settings
    from tzoo.store import create_engine_for, get_artefact, session_factory

    result = runner.invoke(
        app, ["attention", "Share me", "--model", "tiny-t5", "--share"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    url = next(line for line in result.output.splitlines() if line.startswith("Shared: ")).split()[
        -1
    ]
    assert url.startswith("http://127.0.0.1:8000/viz/")
    slug = url.split("/viz/")[1].split("#")[0]
    engine = create_engine_for(Settings().sqlalchemy_url)
    with session_factory(engine)() as session:
        artefact = get_artefact(session, slug)
        assert (
            artefact is not None
            and artefact.input_text == "Share me"
            and artefact.model_name == "tiny-t5"
        )
    engine.dispose()


def test_attention_too_long_is_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZOO_ATTENTION_MAX_TOKENS", "4")
    result = runner.invoke(
        app, ["attention", "far too long a text", "--model", "tiny-gpt2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == EXIT_CODES["InputTooLongError"]
    assert "the limit is 4" in result.output and "Traceback" not in result.output
