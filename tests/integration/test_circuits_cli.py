"""`tzoo circuits explain` and `tzoo circuits graph` on tiny-llama with random transcoders
saved where `tzoo transcoders train` saves them: the paths equal the Python API's, the
written graph reads back as circuit-tracer JSON, and bad input gets a sentence and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tzoo.circuits.agent import explain_circuit
from tzoo.circuits.graph_json import read_graph_json
from tzoo.circuits.io import default_transcoders_dir, save_transcoders
from tzoo.cli import app
from tzoo.config import get_settings
from tzoo.runtime.manager import ModelManager

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_attribution import PROMPT, random_transcoders

runner = CliRunner()
ENV = {"COLUMNS": "300"}


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelManager, object]:
    monkeypatch.setenv("TZOO_TRANSCODERS_DIR", str(tmp_path / "transcoders"))
    get_settings.cache_clear()
    manager = ModelManager(get_settings())
    handle = manager.get("tiny-llama")
    transcoders = random_transcoders(handle, "plt", 0)
    save_transcoders(transcoders, default_transcoders_dir(transcoders.config, get_settings()))
    return manager, transcoders


def test_explain_prints_the_agents_paths(saved: tuple[ModelManager, object]) -> None:
    manager, transcoders = saved
    result = runner.invoke(
        app,
        ["circuits", "explain", PROMPT, "--target", "P", "--model", "tiny-llama",
         "--paths", "3", "--no-labels"],
        env=ENV,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    answer = explain_circuit(
        manager.get("tiny-llama"), transcoders, PROMPT, "P", n_paths=3, label=False
    )  # type: ignore[arg-type]
    assert f"{answer.target_text!r} at position {answer.target_position}" in result.output
    for rank, path in enumerate(answer.paths, start=1):
        assert (
            f"{rank}. [{'+' if path.sign > 0 else '-'}] {path.strength:.4f}  {path.describe()}"
            in result.output
        )


def test_graph_writes_circuit_tracer_json(saved: object, tmp_path: Path) -> None:
    out = tmp_path / "graphs"
    result = runner.invoke(
        app,
        ["circuits", "graph", PROMPT, "--out", str(out), "--slug", "cats", "--model", "tiny-llama"],
        env=ENV,
    )
    assert result.exit_code == 0, result.output
    graph = read_graph_json(out / "cats.json")
    assert graph.metadata.slug == "cats" and graph.nodes and graph.links
    assert (out / "graph-metadata.json").is_file()
    assert "replacement score" in result.output


def test_bad_input_exits_2_with_a_sentence(saved: object) -> None:
    two_tokens = runner.invoke(
        app, ["circuits", "explain", PROMPT, "--target", "Pa", "--model", "tiny-llama"], env=ENV
    )
    assert two_tokens.exit_code == 2 and "is 2 tokens" in two_tokens.output
    none = runner.invoke(
        app, ["circuits", "explain", PROMPT, "--target", "P", "--model", "tiny-gpt2"], env=ENV
    )
    assert none.exit_code == 2 and "No transcoders saved for tiny-gpt2" in none.output
