"""The validation suite's helpers: logits from any output, vocabulary/device/length
detection, attention capture (through PyTorch's fused paths), loading a user's model.py,
and the report's formats."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from validation_zoo import MAX_LEN, VOCAB, TinyCausalLM, build

from tzoo.validation import (
    CheckResult,
    ModelCodeError,
    UntrustedCodeError,
    ValidationReport,
    capture_attention,
    detect_device,
    detect_vocab_size,
    load_subject,
    subject_from_module,
    unwrap_logits,
)
from tzoo.validation import subject as subject_module
from tzoo.validation.subject import DEFAULT_VOCAB_SIZE, detect_max_length

# -- unwrap_logits ---------------------------------------------------------------------------------

LOGITS = torch.randn(2, 3, 5)
POOLED = torch.randn(2, 5)


@pytest.mark.parametrize(
    "output",
    [
        LOGITS,
        (LOGITS, POOLED),
        (POOLED, LOGITS),  # the first 3-D tensor, not the first tensor
        [None, LOGITS],
        {"logits": LOGITS, "hidden": torch.randn(2, 3, 5)},
        {"pooled": POOLED, "scores": LOGITS},
        CausalLMOutput(logits=LOGITS),
        BaseModelOutput(last_hidden_state=LOGITS),
        SimpleNamespace(logits=LOGITS),
    ],
    ids=[
        "tensor",
        "tuple",
        "tuple-3d-second",
        "list",
        "dict",
        "dict-3d",
        "model-output",
        "hidden-state",
        "attribute",
    ],
)
def test_unwrap_logits_finds_the_logits(output: Any) -> None:
    assert unwrap_logits(output) is LOGITS


def test_unwrap_logits_falls_back_to_the_first_tensor_and_refuses_non_tensors() -> None:
    assert unwrap_logits((POOLED, "x")) is POOLED
    with pytest.raises(TypeError, match="no tensor"):
        unwrap_logits(("a", 1))
    with pytest.raises(TypeError, match="Cannot find logits in a str"):
        unwrap_logits("logits")
    with pytest.raises(TypeError, match="Cannot find logits in a NoneType"):
        unwrap_logits(None)


# -- detection -------------------------------------------------------------------------------------


def test_detect_vocab_size_from_config_model_config_embedding_or_default() -> None:
    lm = build(TinyCausalLM)
    assert detect_vocab_size(lm, {"vocab_size": 11}) == (11, "config")
    assert detect_vocab_size(lm, {"n_vocab": 12}) == (12, "config")
    assert detect_vocab_size(lm, {"vocab_size": 0}) == (VOCAB, "first embedding")
    lm.config = SimpleNamespace(vocab_size=13)  # type: ignore[assignment]
    assert detect_vocab_size(lm, {}) == (13, "model config")
    assert detect_vocab_size(lm) == (13, "model config")
    assert detect_vocab_size(build(TinyCausalLM)) == (VOCAB, "first embedding")
    assert detect_vocab_size(nn.Linear(3, 4)) == (DEFAULT_VOCAB_SIZE, "default (GPT-2's)")


def test_detect_device_from_parameters_then_buffers_else_cpu() -> None:
    assert detect_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert detect_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    buffered = nn.Module()
    buffered.register_buffer("table", torch.zeros(2, device="meta"))
    assert detect_device(buffered) == torch.device("meta")
    assert detect_device(nn.ReLU()) == torch.device("cpu")


def test_detect_max_length_from_config_else_the_models_attribute() -> None:
    lm = build(TinyCausalLM)
    assert detect_max_length(lm) == MAX_LEN  # its self.max_len
    assert detect_max_length(lm, {"block_size": 16}) == 16
    assert detect_max_length(nn.Linear(2, 2)) is None
    assert subject_from_module(lm).longest(1000) == MAX_LEN


# -- attention capture -----------------------------------------------------------------------------


def manual_layer0_pattern(model: TinyCausalLM, ids: Tensor) -> Tensor:
    """Layer 0's attention written out: pre-norm, packed projection, causal softmax."""
    layer = model.blocks.layers[0]
    attention = layer.self_attn
    heads, d = attention.num_heads, attention.embed_dim
    x = layer.norm1(model.embed_input(ids, None))
    q, k, _ = (x @ attention.in_proj_weight.T + attention.in_proj_bias).split(d, dim=-1)
    b, t, _ = x.shape
    q = q.view(b, t, heads, d // heads).transpose(1, 2)
    k = k.view(b, t, heads, d // heads).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // heads)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, -math.inf).softmax(-1)


def test_capture_attention_works_through_the_transformer_encoder_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build(TinyCausalLM)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    fused = torch._transformer_encoder_layer_fwd
    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    with torch.no_grad():
        plain = model(ids)
        assert len(calls) == 2  # eval mode: both layers take the fused kernel, no weights
        with capture_attention(model) as captured:
            logits = model(ids)
        assert len(calls) == 2  # switched off inside the block...
        model(ids)
        assert len(calls) == 4  # ...and back on after it
        expected = manual_layer0_pattern(model, ids)
    assert torch.backends.mha.get_fastpath_enabled()
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    assert len(captured.weights) == 2
    assert captured.sources == [
        "blocks.layers.0.self_attn (MultiheadAttention)",
        "blocks.layers.1.self_attn (MultiheadAttention)",
    ]
    for weights in captured.weights:
        assert weights.shape == (2, 4, 7, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
        assert torch.all(weights.triu(1) == 0)  # causal: nothing above the diagonal
    torch.testing.assert_close(captured.weights[0], expected, atol=1e-5, rtol=1e-5)


class SdpaAttention(nn.Module):
    """One attention layer through F.scaled_dot_product_attention, with grouped KV heads."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.dh)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.dh).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.project(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).flatten(2)


def test_capture_attention_records_scaled_dot_product_attention() -> None:
    torch.manual_seed(0)
    module = SdpaAttention().eval()
    x = torch.randn(2, 6, 16)
    real_sdpa = F.scaled_dot_product_attention
    with torch.no_grad():
        plain = module(x)
        with capture_attention(module) as captured:
            out = module(x)
        q, k, _ = module.project(x)
    assert F.scaled_dot_product_attention is real_sdpa  # put back
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    assert captured.sources == ["scaled_dot_product_attention"]
    (weights,) = captured.weights
    assert weights.shape == (2, 4, 6, 6)
    k = k.repeat_interleave(2, dim=1)  # each KV head serves two query heads
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(4)
    expected = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(weights, expected.softmax(-1), atol=1e-6, rtol=1e-5)


# -- loading a user's model.py ---------------------------------------------------------------------

TOY_MODEL = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return x + self.proj(x)


class ToyLM(nn.Module):
    def __init__(self, vocab_size, d_model, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.block = Block(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.block(self.embed(input_ids)))
"""
BUILD_MODEL = (
    TOY_MODEL
    + """

def build_model(config):
    return ToyLM(config["vocab"], config["width"], config["max_seq_len"])
"""
)


def write(folder: Path, code: str, config: dict[str, Any] | str) -> tuple[Path, Path]:
    model_file, config_file = folder / "model.py", folder / "config.json"
    model_file.write_text(code)
    config_file.write_text(config if isinstance(config, str) else json.dumps(config))
    return model_file, config_file


def test_load_subject_from_a_build_model_function(tmp_path: Path) -> None:
    config = {"vocab": 23, "width": 8, "max_seq_len": 12, "name": "toy", "vocab_size": 23}
    model_file, config_file = write(tmp_path, BUILD_MODEL, config)
    subject = load_subject(model_file, config_file)
    assert (subject.name, subject.kind, subject.vocab_size, subject.max_length) == (
        "toy",
        "decoder",
        23,
        12,
    )
    assert subject.takes_attention_mask and subject.model.training is False
    ids = subject.random_ids(2, 5, torch.Generator().manual_seed(0))
    assert subject.logits(ids).shape == (2, 5, 23)
    # The factory builds the same weights every time (seeded), from the same code.
    fresh = subject.fresh_model().state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in subject.model.state_dict().items())


def test_load_subject_from_a_single_model_class(tmp_path: Path) -> None:
    # Two classes, but Block is a part ToyLM builds: ToyLM is the model, built from the
    # config's keys (the name is not one of them).
    config = {"vocab_size": 19, "d_model": 8, "max_len": 10, "name": "single", "causal": True}
    model_file, config_file = write(tmp_path, TOY_MODEL, config)
    subject = load_subject(model_file, config_file)
    assert type(subject.model).__name__ == "ToyLM"
    assert (subject.vocab_size, subject.max_length, subject.notes["vocab_size"]) == (
        19,
        10,
        "config",
    )


def test_a_url_is_refused_without_trust_and_nothing_is_fetched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_network(url: str) -> bytes:
        raise AssertionError(f"fetched {url}")

    monkeypatch.setattr(subject_module, "_fetch", no_network)
    _, config_file = write(tmp_path, TOY_MODEL, {"vocab_size": 5})
    with pytest.raises(UntrustedCodeError) as refused:
        load_subject("https://example.com/model.py", config_file)
    message = str(refused.value)
    assert "Refusing to run code from https://example.com/model.py" in message
    assert "runs with your rights" in message and "--trust-remote-code" in message
    with pytest.raises(UntrustedCodeError, match="Refusing to fetch"):
        load_subject(tmp_path / "model.py", "https://example.com/config.json")
    with pytest.raises(ModelCodeError, match=r"the URL of a model\.py"):
        load_subject("https://example.com/weights.bin")


@pytest.mark.parametrize(
    ("code", "config", "message"),
    [
        (None, {}, "No model file at"),
        ("raise RuntimeError('boom')", {}, "failed: RuntimeError: boom"),
        (TOY_MODEL, "{not json", "is not JSON"),
        (TOY_MODEL, "[1, 2]", "must be a JSON object"),
        (
            "from torch import nn\nclass A(nn.Linear): pass\nclass B(nn.Linear): pass\n",
            {},
            "Cannot tell which class is the model",
        ),
        (TOY_MODEL, {"model_class": "Missing"}, "names model_class 'Missing'"),
        (TOY_MODEL, {"vocab_size": 5}, "Building the model from"),
        ("def build_model(config):\n    return {}\n", {}, "built a dict, not an nn.Module"),
    ],
    ids=[
        "missing",
        "raises",
        "not-json",
        "not-object",
        "ambiguous",
        "no-class",
        "build",
        "not-module",
    ],
)
def test_model_code_errors_say_what_is_wrong(
    tmp_path: Path, code: str | None, config: dict[str, Any] | str, message: str
) -> None:
    model_file, config_file = write(tmp_path, code or "", config)
    if code is None:
        model_file.unlink()
    with pytest.raises(ModelCodeError, match=message) as error:
        load_subject(model_file, config_file)
    if message.startswith("Cannot tell"):
        assert "A, B" in str(error.value) and "build_model" in str(error.value)


# -- the report ------------------------------------------------------------------------------------


def sample_report() -> ValidationReport:
    results = [
        CheckResult("shape_sweep", 1, "pass", 0, 0, "fine", {"sizes": [1, 2]}, 0.5),
        CheckResult("causality", 1, "fail", math.inf, 1e-4, "leak | at <b>3</b>", {}, 0.25),
        CheckResult("latency", 1, "warn", {"p50_ms": 1.5}, None, "slow\nline", {}, 0.0),
        CheckResult("half_precision", 1, "skip", None, None, "no fp16", {}, 0.0),
        CheckResult("memory", 1, "error", None, None, "crashed", {"nan": math.nan}, 0.0),
    ]
    return ValidationReport("<script>alert(1)</script>", results, (1,), {"seed": 0})


def test_report_failed_counts_and_lookup() -> None:
    report = sample_report()
    assert [r.name for r in report.failed] == ["causality", "memory"]
    assert [r.name for r in report.warnings] == ["latency"]
    assert report.ok is False
    assert report.counts() == {"pass": 1, "warn": 1, "fail": 1, "skip": 1, "error": 1}
    assert report["latency"].value == {"p50_ms": 1.5}
    with pytest.raises(KeyError, match="shape_sweep, causality"):
        report["nope"]
    with pytest.raises(ValueError, match="status must be one of"):
        CheckResult("x", 1, "passed", None, None, "")


def test_report_to_dataframe() -> None:
    frame = sample_report().to_dataframe()
    assert list(frame.columns) == [
        "name",
        "tier",
        "status",
        "value",
        "threshold",
        "message",
        "seconds",
    ]
    assert list(frame["status"]) == ["pass", "fail", "warn", "skip", "error"]
    assert frame.loc[1, "value"] == math.inf and frame.loc[0, "seconds"] == 0.5


def test_report_to_markdown_escapes_table_breakers() -> None:
    markdown = sample_report().to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == "# Validation of <script>alert(1)</script>"
    assert "| 1 | causality | ❌ fail | inf | 0.0001 | leak \\| at <b>3</b> |" in lines
    assert '| 1 | latency | ⚠️ warn | {"p50_ms": 1.5} |  | slow line |' in lines
    assert "5 checks, 1 pass, 1 warn, 1 fail, 1 skip, 1 error" in markdown


def test_report_to_html_escapes_everything() -> None:
    report = sample_report()
    page = report.to_html()
    assert page.startswith("<!doctype html>")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "leak | at &lt;b&gt;3&lt;/b&gt;" in page
    assert '<tr class="tz-fail">' in page and "<details>" in page
    fragment = report._repr_html_()
    assert "<html" not in fragment and fragment.startswith('<div class="tz-validation">')
    assert fragment in page


def test_report_dict_round_trip_is_strict_json() -> None:
    report = sample_report()
    data = report.to_dict()
    text = report.to_json()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(text, parse_constant=refuse) == data
    assert data["results"][1]["value"] == "inf"  # infinities as strings
    again = ValidationReport.from_dict(json.loads(text))
    assert again.to_dict() == data
    assert [r.status for r in again.results] == [r.status for r in report.results]
    assert again.results[0] == report.results[0]
    with pytest.raises(ValueError, match="version"):
        ValidationReport.from_dict({**data, "version": 99})
