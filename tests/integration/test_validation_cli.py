"""`tzoo validate`: a user's model.py and config.json, checks chosen by tier or name, the
report written as HTML, Markdown or JSON, exit 1 when a check fails and 2 on bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tzoo.cli import app

runner = CliRunner()
ENV = {"COLUMNS": "200"}
MODEL_PY = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Bigram(nn.Module):
        """Logits from the current token only, unless LEAK: then also from the next one."""

        def __init__(self, vocab_size: int = 50, d_model: int = 16, leak: bool = False) -> None:
            super().__init__()
            self.leak = leak
            self.embed = nn.Embedding(vocab_size, d_model)
            self.out = nn.Linear(d_model, vocab_size)

        def forward(self, input_ids):
            h = self.embed(input_ids)
            if self.leak:
                h = h + torch.roll(h, shifts=-1, dims=1)  # reads the next token
            return self.out(h)
    '''
)


def write_model(tmp_path: Path, **config: object) -> tuple[Path, Path]:
    model, cfg = tmp_path / "model.py", tmp_path / "config.json"
    model.write_text(MODEL_PY)
    cfg.write_text(json.dumps({"name": "bigram", "vocab_size": 50, "max_length": 32, **config}))
    return model, cfg


def test_a_sound_model_passes_and_the_report_is_written(tmp_path: Path) -> None:
    model, config = write_model(tmp_path)
    for suffix in (".html", ".md", ".json"):
        report = tmp_path / f"report{suffix}"
        result = runner.invoke(
            app,
            ["validate", str(model), "--config", str(config), "--checks",
             "causality,determinism,shape_sweep", "--report", str(report)],
            env=ENV,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "causality" in result.output and "pass" in result.output
        assert report.is_file()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["model"] == "bigram"
    assert {r["name"]: r["status"] for r in data["results"]} == {
        "causality": "pass",
        "determinism": "pass",
        "shape_sweep": "pass",
    }
    assert (tmp_path / "report.md").read_text().startswith("# Validation of bigram")
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_a_causal_leak_fails_with_exit_1(tmp_path: Path) -> None:
    model, config = write_model(tmp_path, leak=True)
    result = runner.invoke(
        app, ["validate", str(model), "--config", str(config), "--checks", "causality"], env=ENV
    )
    assert result.exit_code == 1, result.output
    assert "fail" in result.output


def test_listing_the_checks(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", "--list"], env=ENV)
    assert result.exit_code == 0
    for name in ("causality", "gradient_flow", "integrated_gradients", "onnx"):
        assert name in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["https://example.invalid/model.py"], "--trust-remote-code"),
        (["model.py", "--tiers", "7"], "the tiers are 1, 2, 3 and 4"),
        (["model.py", "--report", "out.pdf"], "use a .html, .md or .json file"),
        (["tiny-gpt2", "--checks", "nope"], "No check named nope"),
        ([], "Name a model"),
        (["/no/such/model.py"], "No model file"),
    ],
)
def test_bad_input_exits_2_with_a_sentence(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["validate", *args], env=ENV)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
