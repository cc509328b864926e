"""`tzoo transcoders train` and `tzoo transcoders list` on tiny-llama: a short run that
saves a set circuit-tracer can read and prints the per-layer table, resuming, and bad input
answered with a sentence and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tzoo.circuits.io import load_transcoders
from tzoo.circuits.training import CHECKPOINT_FILE
from tzoo.cli import app

runner = CliRunner()
QUICK = [
    "--model", "tiny-llama", "--features", "64", "--tokens", "1500", "--batch-tokens", "256",
    "--seq-len", "32", "--docs", "8", "--tokens-per-doc", "48", "--heldout", "0.25",
    "--no-shipped", "--lr", "3e-3", "--sparsity", "0.5",
]  # fmt: skip


def test_train_saves_a_set_prints_the_table_and_lists_it(tmp_path: Path) -> None:
    out = tmp_path / "set"
    result = runner.invoke(
        app,
        ["transcoders", "train", *QUICK, "--kind", "skip", "--out", str(out)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for words in ("explained variance", "L0", "dead", "next-token agreement", "Saved the"):
        assert words in result.output
    assert (out / "checkpoints" / CHECKPOINT_FILE).is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        config["model_kind"] == "transcoder_set" and config["feature_input_hook"] == "mlp.hook_in"
    )
    evaluation = config["tzoo"]["training"]["evaluation"]
    assert [row["layer"] for row in evaluation["layers"]] == [0, 1]
    transcoders = load_transcoders(out)
    assert transcoders.config.kind == "skip" and transcoders.config.layers == (0, 1)

    # --resume after the end: nothing left to train, the same set again
    again = runner.invoke(
        app,
        ["transcoders", "train", *QUICK, "--kind", "skip", "--out", str(out), "--resume"],
        env={"COLUMNS": "200"},
    )
    assert again.exit_code == 0, again.output
    assert "Saved the transcoders" in again.output

    listed = runner.invoke(
        app, ["transcoders", "list", "--dir", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert listed.exit_code == 0, listed.output
    assert (
        "set" in listed.output
        and "tiny-llama" in listed.output
        and "skip jumprelu" in listed.output
    )


def test_train_saves_under_the_transcoders_dir_by_default(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "transcoders",
            "train",
            *QUICK,
            "--layers",
            "1",
            "--kind",
            "plt",
            "--activation",
            "topk",
            "--top-k",
            "4",
        ],
        env={"COLUMNS": "200", "TZOO_TRANSCODERS_DIR": str(tmp_path / "tc")},
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tc" / "tiny-llama" / "plt-topk-64f-L1" / "layer_1.safetensors").is_file()
    listed = runner.invoke(
        app,
        ["transcoders", "list"],
        env={"COLUMNS": "200", "TZOO_TRANSCODERS_DIR": str(tmp_path / "tc")},
    )
    assert "tiny-llama/plt-topk-64f-L1" in listed.output


def test_an_encoder_trains_on_the_shipped_texts_and_its_graph_reads_the_mask(
    tmp_path: Path,
) -> None:
    """A masked-LM: transcoders on the encoder stack from the shipped corpus, with the
    prediction agreement measured at every position; then a graph read at the mask."""
    out = tmp_path / "bert"
    quick = [a for a in QUICK if a != "--no-shipped"]
    quick[quick.index("tiny-llama")] = "tiny-bert-mlm"
    result = runner.invoke(
        app, ["transcoders", "train", *quick, "--out", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "training on the texts shipped with tzoo" in result.output
    transcoders = load_transcoders(out)
    assert (
        transcoders.config.stack == "encoder" and transcoders.config.model_name == "tiny-bert-mlm"
    )
    agreement = transcoders.config.training["evaluation"]["next_token_agreement"]
    assert 0 <= agreement <= 1 and f"{agreement:.1%}" in result.output

    graphs = tmp_path / "graphs"
    drawn = runner.invoke(
        app,
        ["circuits", "graph", "Cats [MASK] sat.", "--out", str(graphs), "--model", "tiny-bert-mlm",
         "--transcoders", str(out)],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert drawn.exit_code == 0, drawn.output
    graph = json.loads((graphs / "graph.json").read_text())
    logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    assert logits and {n["ctx_idx"] for n in logits} == {6}  # [CLS] C a t s ␣ [MASK]


def test_list_says_when_there_is_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["transcoders", "list", "--dir", str(tmp_path)])
    assert result.exit_code == 0 and "No transcoders in" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "tiny-llama", "--layers", "0-x"], "Bad --layers '0-x'"),
        (["--model", "tiny-llama", "--layers", "3-1"], "runs backwards"),
        (["--model", "tiny-llama", "--layers", "0-5"], "tiny-llama has 2 layers (0-1)"),
        (["--model", "tiny-llama", "--kind", "sae"], "--kind must be plt, skip or clt"),
        (["--model", "tiny-t5", "--layers", "0"], "tiny-t5 is an encoder-decoder"),
        (["--model", "tiny-bert", "--no-shipped"], "tiny-bert is an encoder and cannot sample"),
    ],
)
def test_bad_input_exits_2_with_a_sentence(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["transcoders", "train", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_cross_layer_transcoder_needs_consecutive_layers() -> None:
    args = ["--model", "tiny-llama", "--kind", "clt", "--layers", "0,2"]
    result = runner.invoke(app, ["transcoders", "train", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "consecutive layers" in result.output
