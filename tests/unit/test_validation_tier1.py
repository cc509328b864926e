"""Tier 1 checks: the well-formed models pass everything that applies to them, and each
model of the bug zoo is flagged by exactly the check meant to catch its bug."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tzoo_testing import make_settings
from validation_zoo import (
    BUG_ZOO,
    VOCAB,
    BatchMixingLM,
    DetachedBranchLM,
    HalfOverflowLM,
    HugeInitLM,
    IgnoresMaskLM,
    LeakyMaskLM,
    TinyCausalLM,
    UnusedLayerLM,
    ZeroWeightLM,
    build,
)

from tzoo.validation import (
    CheckResult,
    Subject,
    ValidationOptions,
    ValidationReport,
    load_subject,
    subject_from_module,
    validate,
)
from tzoo.validation.tier1 import HALF_TOLERANCE

TIER1 = [
    "shape_sweep",
    "batch_equivalence",
    "padding_invariance",
    "causality",
    "determinism",
    "nan_inf",
    "half_precision",
    "gradient_flow",
    "initialisation",
    "memory",
    "latency",
    "save_load",
]
# Small sizes keep a whole tier-1 run on a tiny model well under a second.
OPTIONS = ValidationOptions(
    batch_sizes=(1, 2), seq_lengths=(1, 8, 16), latency_runs=3, extra={"max_test_length": 64}
)
ATOL = OPTIONS.atol


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on one thread: with two, waiting on OpenMP's barriers costs more than the
    maths, and many times more when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(model: nn.Module | Subject, *checks: str, **extra: Any) -> ValidationReport:
    options = OPTIONS
    if extra:
        options = ValidationOptions(
            batch_sizes=OPTIONS.batch_sizes,
            seq_lengths=OPTIONS.seq_lengths,
            latency_runs=OPTIONS.latency_runs,
            extra={**OPTIONS.extra, **extra},
        )
    return validate(model, tiers=(1,), checks=list(checks) or None, options=options)


def check(model: nn.Module | Subject, name: str, **extra: Any) -> CheckResult:
    return run(model, name, **extra)[name]


def not_passing(report: ValidationReport) -> dict[str, str]:
    return {r.name: f"{r.status}: {r.message}" for r in report.results if r.status != "pass"}


# -- well-formed models ------------------------------------------------------------------------


def test_tiny_causal_lm_passes_every_tier1_check() -> None:
    report = run(build(TinyCausalLM))
    assert report.names() == TIER1
    assert not_passing(report) == {}
    # Exact equalities where the maths says so, not merely "within atol".
    assert report["causality"].value == 0.0
    assert report["determinism"].value == 0.0
    assert report["save_load"].value == 0.0
    assert report["batch_equivalence"].value <= ATOL
    padding = report["padding_invariance"].details["tests"]
    assert padding["left padding vs none"]["supported"] is True  # positions count real tokens
    assert report["nan_inf"].value == 0
    assert len(report["shape_sweep"].details["sizes"]) == 2 * 3
    json.loads(report.to_json())  # strict JSON, whatever the checks measured


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tzoo.runtime.manager import ModelManager

    manager = ModelManager(make_settings(tmp_path_factory.mktemp("tier1-models")))
    yield manager
    manager.unload_all()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"])
def test_tiny_hf_models_pass_every_tier1_check_that_applies(name: str, manager: Any) -> None:
    subject = load_subject(name, manager=manager)
    report = run(subject)
    skipped = {r.name: r.message for r in report.results if r.status == "skip"}
    failing = {k: v for k, v in not_passing(report).items() if k not in skipped}
    assert failing == {}
    if name == "tiny-bert":
        assert list(skipped) == ["causality"] and "encoder" in skipped["causality"]
        # BertModel has no LM head: its last hidden state (64 wide) stands in for logits.
        assert report["shape_sweep"].details["last_dimension"].startswith("hidden size")
        assert "pooler.dense.weight" in report["gradient_flow"].details["gradient_norms"]
    else:
        assert skipped == {}
    if name == "tiny-t5":
        assert "decoder token" in report["causality"].message
    assert report["save_load"].details["formats"].keys() == {
        "torch.save",
        "safetensors",
        "save_pretrained",
    }
    assert report["causality"].value in (None, 0.0)
    assert subject.model.training is False  # left in eval mode


def test_checks_that_train_leave_the_model_untouched() -> None:
    model = build(TinyCausalLM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(model, "gradient_flow", "half_precision", "memory")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32


# -- the bug zoo -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"), list(BUG_ZOO.items()), ids=[c.__name__ for c in BUG_ZOO]
)
def test_each_bug_is_flagged_by_exactly_its_check(cls: type[TinyCausalLM], expected: str) -> None:
    report = run(build(cls))
    assert {r.name for r in report.failed} == {expected}, not_passing(report)
    assert report[expected].status == "fail"
    json.loads(report.to_json())


def test_causal_leak_names_the_positions_that_see_the_future() -> None:
    result = check(build(LeakyMaskLM), "causality")
    assert result.status == "fail" and result.value > 100 * ATOL
    # Off by one in each of the 2 layers: changing token t reaches positions t - 1 and
    # t - 2, and nothing earlier.
    per_token = result.details["per_token"]
    assert {t: v["leaking_positions"] for t, v in per_token.items()} == {
        t: [p for p in (int(t) - 2, int(t) - 1) if p >= 0] for t in per_token
    }
    assert result.threshold == ATOL


def test_gradient_flow_names_the_parameters_that_never_learn() -> None:
    detached = check(build(DetachedBranchLM), "gradient_flow")
    unused = check(build(UnusedLayerLM), "gradient_flow")
    assert set(detached.details["problems"]) == {"adapter.weight", "adapter.bias"}
    assert set(unused.details["problems"]) == {"unused.weight", "unused.bias"}
    assert "unused.weight" in unused.message and unused.value == 2
    assert all("no gradient" in why for why in unused.details["problems"].values())
    # Every other parameter did get a gradient.
    assert len(unused.details["gradient_norms"]) == unused.details["trainable_parameters"] - 2


def test_batch_mixing_is_caught_row_by_row() -> None:
    result = check(build(BatchMixingLM), "batch_equivalence")
    diffs = result.details["max_abs_diff"]
    assert diffs["row 0 alone"] > 0.1 and diffs["row 1 alone"] > 0.1
    assert diffs["batch reversed"] <= ATOL  # the order does not matter, the company does
    assert result.value == max(diffs.values())


def test_fp16_overflow_fails_while_bf16_and_fp32_are_fine() -> None:
    model = build(HalfOverflowLM)
    report = run(model, "half_precision", "nan_inf")
    result = report["half_precision"]
    assert result.status == "fail" and "float16" in result.message
    fp16 = result.details["dtypes"]["float16"]["non_finite"]
    assert fp16["nan"] > 0
    bf16 = result.details["dtypes"]["bfloat16"]
    assert bf16["relative_error"] < HALF_TOLERANCE["bfloat16"]
    assert report["nan_inf"].status == "pass"


def test_well_formed_half_precision_is_measured_against_the_logit_scale() -> None:
    result = check(build(TinyCausalLM), "half_precision")
    dtypes = result.details["dtypes"]
    for name in ("bfloat16", "float16"):
        assert 0 < dtypes[name]["relative_error"] <= HALF_TOLERANCE[name]
        expected = dtypes[name]["max_abs_diff"] / result.details["logit_scale"]
        assert dtypes[name]["relative_error"] == pytest.approx(expected)
    # fp16 keeps 3 more mantissa bits than bf16.
    assert dtypes["float16"]["relative_error"] < dtypes["bfloat16"]["relative_error"]


def test_initialisation_flags_bad_weights_but_not_norm_ones_or_zero_biases() -> None:
    zero = check(build(ZeroWeightLM), "initialisation")
    huge = check(build(HugeInitLM), "initialisation")
    table = zero.details["parameters"]
    flagged = {n: row["verdict"] for n, row in table.items() if "verdict" in row}
    assert flagged == {"blocks.layers.0.linear1.weight": "fail"}
    assert huge.status == "fail"
    assert {n for n, r in huge.details["parameters"].items() if "verdict" in r} == {
        "blocks.layers.1.linear2.weight"
    }
    assert huge.details["parameters"]["blocks.layers.1.linear2.weight"]["std_x_sqrt_fan_in"] > 100
    # LayerNorm gains of ones and biases of zeros are by design.
    assert table["norm.weight"]["kind"] == "norm" and table["norm.weight"]["std"] == 0.0
    assert table["blocks.layers.0.self_attn.in_proj_bias"]["kind"] == "vector"
    assert table["blocks.layers.0.self_attn.in_proj_bias"]["std"] == 0.0
    assert table["embed.weight"]["kind"] == "embedding"
    # A Linear's default init: std = 1 / sqrt(3 fan-in).
    linear = table["blocks.layers.0.linear2.weight"]
    assert linear["fan_in"] == 128
    assert linear["std_x_sqrt_fan_in"] == pytest.approx(1 / math.sqrt(3), rel=0.05)


class BareParametersLM(nn.Module):
    """minGPT style: a position table as a bare parameter of zeros, and a bare matrix."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.pos_emb = nn.Parameter(torch.zeros(1, 16, 8))
        self.w_out = nn.Parameter(torch.randn(8, VOCAB) * scale)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids) + self.pos_emb[:, : input_ids.shape[1]]
        return x @ self.w_out


def test_initialisation_of_bare_parameters() -> None:
    sane = check(BareParametersLM(scale=8**-0.5), "initialisation")
    assert sane.status == "warn" and sane.value == 1  # a zero table learns, but is unusual
    assert sane.details["parameters"]["pos_emb"]["kind"] == "embedding"
    assert "all zeros" in sane.details["parameters"]["pos_emb"]["why"]
    assert sane.details["parameters"]["w_out"]["fan_in"] == 8  # used as (in, out), not (out, in)
    huge = check(BareParametersLM(scale=100.0), "initialisation")
    assert huge.status == "fail" and huge.details["parameters"]["w_out"]["verdict"] == "fail"


def test_ignored_mask_shows_under_left_padding_only() -> None:
    result = check(build(IgnoresMaskLM), "padding_invariance")
    tests = result.details["tests"]
    # A causal model hides an ignored mask under right padding: the pads come after.
    assert tests["right padding vs none"]["max_abs_diff"] == 0.0
    assert tests["left padding: masked tokens changed"]["max_abs_diff"] > 0.01
    assert result.status == "fail" and "masked" in result.message


# -- each check's other verdicts and skips ----------------------------------------------------


class NoMaskLM(nn.Module):
    """Takes no attention mask; logits from a table of positions (8 long, unannounced)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.table = nn.Embedding(8, 8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        at = torch.arange(input_ids.shape[1])
        return self.out(self.embed(input_ids) + self.table(at))


def test_shape_sweep_lists_the_sizes_that_broke() -> None:
    result = check(NoMaskLM(), "shape_sweep")
    assert result.status == "fail" and result.value == 2  # T=16 at batch 1 and 2
    assert "B=1, T=16: IndexError" in result.message
    ok = [row for row in result.details["sizes"] if "error" not in row]
    assert [row["length"] for row in ok] == [1, 8, 1, 8]


def test_shape_sweep_never_goes_past_the_max_length() -> None:
    subject = subject_from_module(NoMaskLM(), {"max_len": 8})
    result = check(subject, "shape_sweep")
    assert result.status == "pass"
    assert max(row["length"] for row in result.details["sizes"]) == 8
    assert "[16] capped" in result.details["lengths_capped"]


class TransposedLM(TinyCausalLM):
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return super().forward(input_ids, attention_mask).transpose(1, 2)


def test_shape_sweep_fails_a_wrong_shape() -> None:
    result = check(build(TransposedLM), "shape_sweep")
    assert result.status == "fail" and result.value == 6
    assert "B=1, T=8: got (1, 97, 8), expected (1, 8, 97)" in result.message


def test_padding_skips_a_model_without_a_mask_and_causality_skips_an_encoder() -> None:
    assert "attention_mask" in check(NoMaskLM(), "padding_invariance").message
    encoder = subject_from_module(build(TinyCausalLM), kind="encoder")
    result = check(encoder, "causality")
    assert result.status == "skip" and "bidirectional" in result.message


class DropoutInEvalLM(TinyCausalLM):
    def unembed(self, h: Tensor) -> Tensor:
        return super().unembed(F.dropout(h, 0.5, training=True))


def test_determinism_fails_randomness_in_eval_mode() -> None:
    result = check(build(DropoutInEvalLM), "determinism")
    assert result.status == "fail" and result.value > ATOL and result.threshold == 0.0


class NonFiniteLM(TinyCausalLM):
    """NaN wherever the top token is, +inf wherever token 1 is."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = super().forward(input_ids, attention_mask)
        logits = logits.masked_fill((input_ids == VOCAB - 1)[..., None], math.nan)
        return logits.masked_fill((input_ids == 1)[..., None], math.inf)


def test_nan_inf_counts_and_locates_non_finite_logits() -> None:
    result = check(build(NonFiniteLM), "nan_inf")
    inputs = result.details["inputs"]
    top = inputs[f"token {VOCAB - 1} repeated 64 times"]
    assert (top["nan"], top["posinf"], top["neginf"]) == (64 * VOCAB, 0, 0)
    assert top["first_positions"][:3] == [[0, 0], [0, 1], [0, 2]]
    low = inputs["token 1 repeated 64 times"]
    assert (low["nan"], low["posinf"]) == (0, 64 * VOCAB)
    assert result.status == "fail" and result.value >= 2 * 64 * VOCAB


class HalfUnsupportedLM(TinyCausalLM):
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        dtype = self.embed.weight.dtype
        if dtype != torch.float32:
            raise RuntimeError(f'"addmm_impl_cpu_" not implemented for {dtype}')
        return super().forward(input_ids, attention_mask)


class Float32InsideLM(TinyCausalLM):
    def unembed(self, h: Tensor) -> Tensor:
        return super().unembed(h @ torch.eye(h.shape[-1]))  # float32, whatever h is


def test_half_precision_skips_missing_kernels_but_fails_dtype_bugs() -> None:
    skipped = check(build(HalfUnsupportedLM), "half_precision")
    assert skipped.status == "skip" and "not implemented" in skipped.message
    crashed = check(build(Float32InsideLM), "half_precision")
    assert crashed.status == "fail" and "crashed" in crashed.message


def test_memory_training_above_inference_and_a_budget_warns() -> None:
    result = check(build(TinyCausalLM), "memory")
    sizes = result.details["sizes_mb"]
    assert set(sizes) == {"1x8", "1x16", "2x8", "2x16"}
    static = result.details["static_mb"]
    for row in sizes.values():
        assert static < row["inference_mb"] < row["training_mb"]
    # Bigger inputs need more memory; training at 2x16 holds at least the logits (2*16*97
    # floats) twice over (the output and its gradient) plus one gradient per parameter.
    assert sizes["2x16"]["training_mb"] > sizes["1x8"]["training_mb"]
    assert (sizes["2x16"]["training_mb"] - 2 * static) * 2**20 > 2 * 2 * 16 * VOCAB * 4
    assert result.value["training_mb"] == max(r["training_mb"] for r in sizes.values())
    warned = check(build(TinyCausalLM), "memory", memory_budget_mb=0.01)
    assert warned.status == "warn" and warned.threshold == 0.01


def test_latency_reports_percentiles_and_warns_over_a_budget() -> None:
    result = check(build(TinyCausalLM), "latency")
    assert result.status == "pass" and result.threshold is None
    runs = result.details["runs_ms"]
    assert len(runs) == OPTIONS.latency_runs
    assert min(runs) <= result.value["p50_ms"] <= result.value["p95_ms"] <= max(runs)
    assert result.value["p50_ms"] == sorted(runs)[1]
    slow = check(build(TinyCausalLM), "latency", latency_budget_ms=1e-6)
    assert slow.status == "warn" and "budget" in slow.message


class HiddenStateLM(TinyCausalLM):
    """Keeps a random scale as a plain attribute: not saved with the state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.rand(VOCAB) + 0.5

    def unembed(self, h: Tensor) -> Tensor:
        return super().unembed(h) * self.scale


def test_save_load_fails_state_outside_the_state_dict(tmp_path: Path) -> None:
    seeds = iter(range(1, 100))
    subject = subject_from_module(
        build(HiddenStateLM), factory=lambda: build(HiddenStateLM, next(seeds))
    )
    result = check(subject, "save_load")
    assert result.status == "fail" and result.value > ATOL
    assert set(result.details["formats"]) == {"torch.save", "safetensors"}
    assert check(subject_from_module(build(TinyCausalLM)), "save_load").status == "pass"
