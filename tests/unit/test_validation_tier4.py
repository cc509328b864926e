"""Tier 4: TorchScript, torch.export and ONNX parity with eager, on the plain TinyCausalLM and
tiny Hugging Face models, and models whose converted graphs are wrong or fixed in shape."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from tzoo_testing import make_settings
from validation_zoo import tiny_causal_lm

from tzoo.runtime.manager import ModelManager
from tzoo.validation import (
    CheckResult,
    Subject,
    ValidationOptions,
    load_subject,
    subject_from_module,
    tier4,
    validate,
)

CHECKS = ("torchscript", "torch_export", "onnx")


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("tier4")))


@pytest.fixture(autouse=True)
def _own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every temporary file of a check lands in a folder the test can look into."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def check(subject: Subject | nn.Module, name: str, **extra: Any) -> CheckResult:
    options = ValidationOptions(extra=extra)
    return validate(subject, tiers=(4,), checks=[name], options=options)[name]


class _Base(nn.Module):
    """Embedding + linear: one position's logits depend on its own token only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 50)


class LengthBranchLM(_Base):
    """Branches on the Python int of the input length: a trace at an even length keeps the
    branch for every length."""

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids)
        if int(input_ids.shape[1]) % 2 == 0:
            h = h * 2.0
        return self.out(h)


class ReshapeBakedLM(_Base):
    """Reshapes with the example's sizes as Python ints: the graph errors at other shapes."""

    def forward(self, input_ids: Tensor) -> Tensor:
        b, t = (int(n) for n in input_ids.shape)
        h = self.embed(input_ids).reshape(b * t, -1)
        return self.out(h).reshape(b, t, -1)


class UntraceableLM(_Base):
    def forward(self, input_ids: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("this model's custom kernel cannot be traced")
        return self.out(self.embed(input_ids))


class NoOnnxOpLM(_Base):
    """Uses an op the ONNX exporter has no translation for (torch.special.zeta)."""

    def forward(self, input_ids: Tensor) -> Tensor:
        h = torch.special.zeta(self.embed(input_ids).abs() + 2, torch.tensor(2.0))
        return self.out(h)


def assert_parity(result: CheckResult) -> None:
    assert result.status == "pass", result.message
    probes = result.details["probes"]
    # The example, another length and another batch size, all within the tolerance.
    assert [p["shape"] for p in probes] == [[2, 8], [2, 13], [3, 8]]
    assert all(p["outcome"] == "match" for p in probes)
    assert result.threshold == 1e-4
    assert result.value == max(p["relative_diff"] for p in probes) <= 1e-4


# -- well-formed models: parity --------------------------------------------------------------------


def assert_reported(result: CheckResult) -> None:
    """What each check says about how it converted a well-formed model."""
    details = result.details
    if result.name == "torch_export":
        assert details["shapes"] == "dynamic batch and length"
        assert details["failed_attempts"] == []
        assert len(details["range_constraints"]) == 2  # a batch and a length symbol
    elif result.name == "onnx":
        assert details["exporter"] == "torch.onnx.export(dynamo=True)"
        assert details["shapes"] == "dynamic batch and length"
        # Both input axes are symbolic in the ONNX graph, not numbers.
        assert len(details["onnx_input_shape"]) == 2
        assert all(not dim.isdigit() for dim in details["onnx_input_shape"])
    else:
        deprecation = details["deprecation"]
        if deprecation is None:  # a torch that does not deprecate torch.jit
            assert "warns" not in result.message
        else:  # said, and the check still ran
            assert "deprecated" in deprecation and deprecation in result.message


@pytest.mark.parametrize("name", CHECKS)
def test_tiny_causal_lm_converts_with_parity(name: str, _own_tempdir: Path) -> None:
    result = check(tiny_causal_lm(), name)
    assert_parity(result)
    assert_reported(result)
    assert list(_own_tempdir.iterdir()) == []  # no file left behind


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("name", CHECKS)
def test_tiny_hf_models_convert_with_parity(
    manager: ModelManager, model: str, name: str, _own_tempdir: Path
) -> None:
    result = check(load_subject(model, manager=manager), name)
    assert_parity(result)
    assert_reported(result)
    assert list(_own_tempdir.iterdir()) == []


# -- converted graphs that are wrong or fixed in shape ------------------------------------------------


def test_torchscript_catches_a_trace_wrong_at_other_lengths() -> None:
    result = check(LengthBranchLM().eval(), "torchscript")
    assert result.status == "fail"
    outcomes = {p["probe"]: p["outcome"] for p in result.details["probes"]}
    # Traced at length 8 (even): right there and at another batch size, wrong at 13.
    assert outcomes == {"example": "match", "length 13": "mismatch", "batch 3": "match"}
    assert "length 13" in result.message and "different logits" in result.message
    assert any("Python integer" in w for w in result.details["tracer_warnings"])
    assert result.value > 0.1


def test_a_correct_model_is_not_caught_by_the_same_probe() -> None:
    """The mirror of the test above: the same layers without the branch pass."""

    class Plain(_Base):
        def forward(self, input_ids: Tensor) -> Tensor:
            return self.out(self.embed(input_ids) * 2.0)

    assert check(Plain().eval(), "torchscript").status == "pass"


def test_torch_export_falls_back_to_a_specialised_length_and_warns() -> None:
    result = check(LengthBranchLM().eval(), "torch_export")
    assert result.status == "warn"
    assert result.details["shapes"] == "dynamic where the model allows"
    assert result.details["failed_attempts"][0]["attempt"] == "dynamic batch and length"
    outcomes = {p["probe"]: p["outcome"] for p in result.details["probes"]}
    assert outcomes == {"example": "match", "length 13": "error", "batch 3": "match"}
    assert "only works for the example's shape" in result.message


def test_torchscript_graph_fixed_in_shape_warns() -> None:
    result = check(ReshapeBakedLM().eval(), "torchscript")
    assert result.status == "warn"
    outcomes = [p["outcome"] for p in result.details["probes"]]
    assert outcomes == ["match", "error", "error"]


def test_untraceable_model_skips_with_the_reason() -> None:
    result = check(UntraceableLM().eval(), "torchscript")
    assert result.status == "skip"
    assert "torch.jit.trace cannot trace this model" in result.message
    assert "custom kernel cannot be traced" in result.message


def test_onnx_export_failure_is_a_clear_fail(_own_tempdir: Path) -> None:
    result = check(NoOnnxOpLM().eval(), "onnx")
    assert result.status == "fail"
    assert result.message.startswith("torch.onnx.export (the dynamo exporter) failed")
    assert "zeta" in result.message  # names the op without a translation
    assert "\x1b[" not in result.message  # the exporter's colours are stripped
    assert list(_own_tempdir.iterdir()) == []


def test_onnx_skips_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "onnxruntime" else real(name, *args)

    monkeypatch.setattr(tier4.importlib.util, "find_spec", find_spec)
    result = check(tiny_causal_lm(), "onnx")
    assert result.status == "skip"
    assert "onnxruntime not installed" in result.message


def test_tolerance_is_relative_to_the_logit_scale() -> None:
    rows = tier4._compare(
        lambda ids: torch.full((1, 2, 3), 100.0 + 5e-3),
        lambda ids: torch.full((1, 2, 3), 100.0),
        {"example": torch.zeros(1, 2, dtype=torch.long)},
        rtol=1e-4,
    )
    # 5e-3 off on logits of 100: 5e-5 of the scale, within 1e-4.
    assert rows[0]["outcome"] == "match"
    assert rows[0]["relative_diff"] == pytest.approx(5e-5, rel=1e-3)
    rows = tier4._compare(
        lambda ids: torch.full((1, 2, 3), 0.5 + 5e-3),
        lambda ids: torch.full((1, 2, 3), 0.5),
        {"example": torch.zeros(1, 2, dtype=torch.long)},
        rtol=1e-4,
    )
    assert rows[0]["outcome"] == "mismatch"  # small logits: judged against 1, not 0.5


def test_probes_stay_within_the_models_longest_input() -> None:
    subject = subject_from_module(tiny_causal_lm(), {"max_position_embeddings": 10})
    result = check(subject, "torch_export")
    assert [p["shape"] for p in result.details["probes"]] == [[2, 8], [2, 10], [3, 8]]
    assert result.status == "pass"
