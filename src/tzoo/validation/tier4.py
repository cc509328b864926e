"""Tier 4: the model converted for deployment gives the eager model's logits.

Each check converts a wrapper that takes ``input_ids`` and returns only the logits (through
``Subject.logits``, so any output type works), built from an example batch of 2 x 8 tokens
(2, not 1: exporters specialise a dimension of size 1), then compares with eager on three
probes: the example itself, another length and another batch size. Differences are judged
relative to the logits' scale: max |converted - eager| / max(1, max |eager|) against
``export_rtol`` (1e-4 by default: float32 kernels reordered, never a wrong graph).

- A wrong result on any probe fails (a converted graph that silently computes something
  else, typically a traced shape baked in as a constant).
- An error on another shape only warns: the graph works, but only for the example's shape.

Knobs live in ``options.extra``: ``export_rtol``, ``export_lengths`` (example, other) and
``export_batches`` (example, other).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tzoo.validation.registry import CheckContext, Outcome, SkipCheck, register
from tzoo.validation.report import Status
from tzoo.validation.subject import Subject

DEFAULTS: dict[str, Any] = {
    "export_rtol": 1e-4,
    "export_lengths": (8, 13),
    "export_batches": (2, 3),
}


def _extra(ctx: CheckContext, key: str) -> Any:
    return ctx.options.extra.get(key, DEFAULTS[key])


class LogitsOnly(nn.Module):
    """``forward(input_ids) -> logits``: the subject's model with one tensor in, one out, as
    tracers and exporters want."""

    def __init__(self, subject: Subject) -> None:
        super().__init__()
        self.model = subject.model
        self._subject = subject  # a dataclass, not a module: not registered as a child

    def forward(self, input_ids: Tensor) -> Tensor:
        return self._subject.logits(input_ids, model=self.model)


def _probes(ctx: CheckContext) -> dict[str, Tensor]:
    """The example input and the probes: name -> ids. ``example`` comes first."""
    subject = ctx.subject
    first, second = (subject.longest(int(n)) for n in _extra(ctx, "export_lengths"))
    batch, other_batch = (int(n) for n in _extra(ctx, "export_batches"))
    probes = {"example": ctx.ids(batch, first, offset=401)}
    if second != first:
        probes[f"length {second}"] = ctx.ids(batch, second, offset=402)
    probes[f"batch {other_batch}"] = ctx.ids(other_batch, first, offset=403)
    return probes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>: ")


def _first_line(error: BaseException, limit: int = 400) -> str:
    """``Type: the line that says what went wrong``: the first line, or for the ONNX
    exporter's long reports the first line of their exception summary."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    kind = type(error).__name__
    line = lines[0] if lines else ""
    for index, text in enumerate(lines[:-1]):
        if "Exception summary" in text:
            summary = lines[index + 1]
            match = _CLASS.match(summary)
            kind, line = (match.group(1), summary[match.end() :]) if match else (kind, summary)
            break
    else:
        # torch.export's constraint errors say which dimension on the line after.
        if len(lines) > 1 and lines[1].startswith("- "):
            line = f"{line} {lines[1][2:]}"
    line = line if len(line) <= limit else line[: limit - 1] + "…"
    return f"{kind}: {line}" if line else kind


def _error_text(error: BaseException, limit: int = 4000) -> str:
    text = _ANSI.sub("", f"{type(error).__name__}: {error}")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compare(
    run: Callable[[Tensor], Tensor],
    eager: Callable[[Tensor], Tensor],
    probes: dict[str, Tensor],
    rtol: float,
) -> list[dict[str, Any]]:
    """One row per probe: shape, outcome (match, mismatch, error), max abs and relative
    difference or the error."""
    rows = []
    for name, ids in probes.items():
        row: dict[str, Any] = {"probe": name, "shape": list(ids.shape)}
        with torch.no_grad():
            expected = eager(ids)
            try:
                got = run(ids)
            except Exception as error:
                row.update(outcome="error", error=_first_line(error))
                rows.append(row)
                continue
        got = got.detach().float().to(expected.device)
        if got.shape != expected.shape:
            row.update(
                outcome="mismatch", error=f"shape {list(got.shape)}, eager {list(expected.shape)}"
            )
            rows.append(row)
            continue
        scale = max(1.0, float(expected.abs().max()))
        difference = float((got - expected).abs().max())
        relative = difference / scale
        ok = math.isfinite(relative) and relative <= rtol
        row.update(
            outcome="match" if ok else "mismatch",
            max_abs_diff=difference,
            relative_diff=relative,
            logit_scale=scale,
        )
        rows.append(row)
    return rows


def _judge(
    what: str, rows: list[dict[str, Any]], rtol: float, details: dict[str, Any], cause: str = ""
) -> Outcome:
    """The outcome of the probes (see the module docstring)."""
    details["probes"] = rows
    ran = [r["relative_diff"] for r in rows if "relative_diff" in r]
    value = max(ran) if ran else None
    example = rows[0]
    wrong = [r for r in rows if r["outcome"] == "mismatch"]
    broken = [r for r in rows if r["outcome"] == "error"]

    def describe(row: dict[str, Any]) -> str:
        shape = "x".join(map(str, row["shape"]))
        if "relative_diff" in row:
            return f"{row['probe']} ({shape}): relative difference {row['relative_diff']:.3g}"
        return f"{row['probe']} ({shape}): {row.get('error', '')}"

    status: Status
    if example["outcome"] != "match":
        status = "fail"
        message = f"The {what} is wrong on the input it was built from: {describe(example)}."
    elif wrong:
        status = "fail"
        message = (
            f"The {what} gives different logits from eager on other shapes: "
            + "; ".join(describe(r) for r in wrong)
            + ". The converted graph baked in something of the example's shape."
            + (f" {cause}" if cause else "")
        )
    elif broken:
        status = "warn"
        message = (
            f"The {what} matches eager on the example but fails on other shapes ("
            + "; ".join(describe(r) for r in broken)
            + "): it only works for the example's shape."
            + (f" {cause}" if cause else "")
        )
    else:
        status = "pass"
        shapes = ", ".join("x".join(map(str, r["shape"])) for r in rows)
        message = f"The {what} matches eager within {rtol:g} of the logit scale on {shapes}."
        if value is not None:
            message += f" Largest relative difference {value:.3g}."
    return Outcome(status, value, rtol, message, details)


@contextlib.contextmanager
def _recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _unique_messages(caught: list[warnings.WarningMessage], limit: int = 8) -> list[str]:
    seen: list[str] = []
    for item in caught:
        text = f"{item.category.__name__}: {str(item.message).strip().splitlines()[0]}"
        if text not in seen:
            seen.append(text)
    return seen[:limit]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` inside the block (the ONNX exporter logs a warning
    per optional torchvision op it cannot register)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- TorchScript ------------------------------------------------------------------------------


@register("torchscript", tier=4)
def torchscript(ctx: CheckContext) -> Outcome:
    """torch.jit.trace parity with eager, including lengths and batch sizes not traced."""
    jit = getattr(torch, "jit", None)
    if jit is None or not hasattr(jit, "trace"):
        raise SkipCheck(f"torch {torch.__version__} has no torch.jit.trace.")
    wrapper = LogitsOnly(ctx.subject).eval()
    probes = _probes(ctx)
    example = probes["example"]
    ctx.note(f"tracing on {tuple(example.shape)}")
    with _recorded_warnings() as caught, torch.no_grad():
        try:
            # Our own comparison replaces check_trace, which reruns on the same input only.
            traced = jit.trace(wrapper, (example,), check_trace=False)
        except Exception as error:
            raise SkipCheck(
                f"torch.jit.trace cannot trace this model ({_first_line(error)}); TorchScript "
                "parity does not apply."
            ) from error
    deprecated = [
        str(w.message).strip().splitlines()[0]
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "jit" in str(w.message)
    ]
    tracer = [w for w in caught if issubclass(w.category, jit.TracerWarning)]
    rtol = float(_extra(ctx, "export_rtol"))
    rows = _compare(traced, wrapper, probes, rtol)
    details: dict[str, Any] = {
        "traced_shape": list(example.shape),
        "tracer_warnings": _unique_messages(tracer),
        "deprecation": deprecated[0] if deprecated else None,
        "torch": torch.__version__,
    }
    cause = ""
    if tracer:
        cause = (
            f"Tracing warned {len(tracer)} time(s), e.g. «{_unique_messages(tracer, 1)[0]}»: "
            "Python values computed from tensors (a length turned into an int, a branch on "
            "a tensor) are frozen into the trace."
        )
    else:
        cause = (
            "Tracing records one path through Python control flow with the example's values "
            "as constants."
        )
    outcome = _judge("traced TorchScript graph", rows, rtol, details, cause)
    if deprecated:
        outcome = Outcome(
            outcome.status,
            outcome.value,
            outcome.threshold,
            f"{outcome.message} (torch {torch.__version__} warns: {deprecated[0]})",
            outcome.details,
        )
    return outcome


# -- torch.export -------------------------------------------------------------------------------


def _dynamic_attempts() -> list[tuple[str, Any]]:
    """(label, dynamic_shapes) to try in order: both dimensions dynamic; dynamic where the
    model allows (Dim.AUTO specialises the rest); fully static."""
    dim = torch.export.Dim
    return [
        ("dynamic batch and length", {"input_ids": {0: dim.DYNAMIC, 1: dim.DYNAMIC}}),
        ("dynamic where the model allows", {"input_ids": {0: dim.AUTO, 1: dim.AUTO}}),
        ("static (the example's shape)", None),
    ]


def _export(
    build: Callable[[Any], Any], note: Callable[[str], None]
) -> tuple[Any, str, list[dict[str, str]]]:
    """(result, which attempt worked, the failures before it) over ``_dynamic_attempts``;
    raises the last error when none works."""
    failures: list[dict[str, str]] = []
    last: Exception | None = None
    for label, dynamic in _dynamic_attempts():
        note(f"exporting with {label}")
        try:
            return build(dynamic), label, failures
        except Exception as error:
            failures.append({"attempt": label, "error": _first_line(error)})
            last = error
    assert last is not None
    raise last


@register("torch_export", tier=4)
def torch_export(ctx: CheckContext) -> Outcome:
    """torch.export.export (dynamic shapes where possible) parity with eager."""
    export = getattr(getattr(torch, "export", None), "export", None)
    if export is None:
        raise SkipCheck(f"torch {torch.__version__} has no torch.export.")
    wrapper = LogitsOnly(ctx.subject).eval()
    probes = _probes(ctx)
    example = probes["example"]

    def build(dynamic: Any) -> Any:
        with torch.no_grad(), _recorded_warnings():
            return export(wrapper, (example,), dynamic_shapes=dynamic)

    rtol = float(_extra(ctx, "export_rtol"))
    try:
        program, shapes, failures = _export(build, ctx.note)
    except Exception as error:
        return Outcome(
            "fail",
            None,
            rtol,
            f"torch.export.export failed even with static shapes: {_first_line(error)}",
            {"error": _error_text(error)},
        )
    module = program.module()
    rows = _compare(module, wrapper, probes, rtol)
    details: dict[str, Any] = {
        "shapes": shapes,
        "range_constraints": {str(k): str(v) for k, v in program.range_constraints.items()},
        "failed_attempts": failures,
        "torch": torch.__version__,
    }
    cause = ""
    if failures:
        cause = f"Exporting with {failures[0]['attempt']} failed: {failures[0]['error']}"
    outcome = _judge(f"exported program ({shapes})", rows, rtol, details, cause)
    return outcome


# -- ONNX ---------------------------------------------------------------------------------------


@register("onnx", tier=4)
def onnx_parity(ctx: CheckContext) -> Outcome:
    """ONNX export (torch.onnx, dynamic axes) run in onnxruntime, parity with eager."""
    missing = [
        m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise SkipCheck(
            f"{', '.join(missing)} not installed (pip install {' '.join(missing)}); the ONNX "
            "export needs onnx and onnxscript, running it onnxruntime."
        )
    import onnxruntime as ort

    wrapper = LogitsOnly(ctx.subject).eval()
    probes = _probes(ctx)
    example = probes["example"]
    rtol = float(_extra(ctx, "export_rtol"))
    with tempfile.TemporaryDirectory(prefix="tzoo-onnx-") as folder:
        path = Path(folder) / "model.onnx"

        def build(dynamic: Any) -> Any:
            # dynamo=True is torch.onnx's default since 2.9; said explicitly so the report
            # names the exporter it used. Its progress lines go to stdout: kept out of ours.
            with (
                torch.no_grad(),
                _recorded_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                _quiet_logger("torch.onnx"),
            ):
                return torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    input_names=["input_ids"],
                    output_names=["logits"],
                    dynamic_shapes=dynamic,
                    dynamo=True,
                    verbose=False,
                )

        try:
            _, shapes, failures = _export(build, ctx.note)
        except Exception as error:
            return Outcome(
                "fail",
                None,
                rtol,
                "torch.onnx.export (the dynamo exporter) failed even with static shapes: "
                f"{_first_line(error)}",
                {"error": _error_text(error), "exporter": "dynamo"},
            )
        providers = ["CPUExecutionProvider"]
        if ctx.subject.device.type == "cuda" and "CUDAExecutionProvider" in (
            ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        rows, declared = _run_onnx(path, providers, wrapper, probes, rtol)
        size = sum(f.stat().st_size for f in Path(folder).iterdir())
    details: dict[str, Any] = {
        "exporter": "torch.onnx.export(dynamo=True)",
        "shapes": shapes,
        "onnx_input_shape": declared,
        "failed_attempts": failures,
        "providers": providers,
        "onnx_bytes": size,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    cause = ""
    if failures:
        cause = f"Exporting with {failures[0]['attempt']} failed: {failures[0]['error']}"
    return _judge(f"ONNX model ({shapes}) in onnxruntime", rows, rtol, details, cause)


def _run_onnx(
    path: Path,
    providers: list[str],
    eager: Callable[[Tensor], Tensor],
    probes: dict[str, Tensor],
    rtol: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the probe rows of the ONNX file in onnxruntime, its declared input shape); the
    session is gone when this returns, so its files can then be removed."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # shape mismatches come back as our probe errors
    session = ort.InferenceSession(str(path), options, providers=providers)
    input_name = session.get_inputs()[0].name

    def run(ids: Tensor) -> Tensor:
        output = session.run(None, {input_name: ids.detach().cpu().numpy().astype(np.int64)})
        return torch.from_numpy(np.asarray(output[0]))

    rows = _compare(run, eager, probes, rtol)
    return rows, [str(d) for d in session.get_inputs()[0].shape]
