"""``validate``: run the registered checks of the chosen tiers on a model and gather a
``ValidationReport``."""

from __future__ import annotations

import platform
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tzoo.validation.registry import (
    CheckContext,
    SkipCheck,
    ValidationOptions,
    registered,
)
from tzoo.validation.report import CheckResult, ValidationReport
from tzoo.validation.subject import Subject, load_subject

TIERS = (1, 2, 3, 4)
ProgressFn = Callable[[int, int, str], None]  # (checks done, checks in all, what runs now)


def parse_tiers(spec: str) -> tuple[int, ...]:
    """``"1,2"`` or ``"1-4"`` -> the tiers, sorted; ValueError saying what is wrong."""
    tiers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError("use numbers and ranges such as 1,2 or 1-4.")
        tiers.update(range(int(first), int(last if dash else first) + 1))
    if not tiers or not tiers <= set(TIERS):
        raise ValueError("the tiers are 1, 2, 3 and 4.")
    return tuple(sorted(tiers))


def validate(
    model: nn.Module | Subject | str | Path,
    config: Mapping[str, Any] | str | Path | None = None,
    tiers: Iterable[int] = (1, 2),
    *,
    checks: Iterable[str] | None = None,
    seed: int = 0,
    options: ValidationOptions | None = None,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> ValidationReport:
    """Validate ``model`` (an ``nn.Module``, a ``Subject``, a ``model.py`` path or URL, or a
    catalogue name) with the checks of ``tiers`` (or only those named in ``checks``).

    Every check returns pass, warn or fail with its measured value and threshold (skip when
    it does not apply; error when it crashed). The model is put in eval mode; checks that
    train work on copies, so the model you pass is left as it was."""
    chosen_tiers = tuple(sorted(set(tiers)))
    unknown = [t for t in chosen_tiers if t not in TIERS]
    if unknown:
        raise ValueError(f"Tiers are {', '.join(map(str, TIERS))}; got {unknown}.")
    subject = (
        model
        if isinstance(model, Subject)
        else load_subject(model, config, trust_remote_code=trust_remote_code)
    )
    specs = [s for s in registered() if s.tier in chosen_tiers]
    if checks is not None:
        wanted = list(checks)
        known = {s.name for s in registered()}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise ValueError(
                f"No check named {', '.join(missing)}; the checks are {', '.join(sorted(known))}."
            )
        specs = [s for s in registered() if s.name in wanted]
    opts = options or ValidationOptions()
    was_training = subject.model.training
    subject.model.eval()
    results: list[CheckResult] = []
    try:
        for index, spec in enumerate(specs):
            if progress is not None:
                progress(index, len(specs), spec.name)
            context = CheckContext(
                subject, opts, seed, progress=_noting(progress, index, len(specs), spec.name)
            )
            results.append(_run_one(spec.name, spec.tier, spec.fn, context))
            subject.model.eval()
        if progress is not None:
            progress(len(specs), len(specs), "done")
    finally:
        subject.model.train(was_training)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(subject.device),
        "seed": seed,
        "kind": subject.kind,
        "vocab_size": subject.vocab_size,
        "max_length": subject.max_length,
        "parameters": sum(p.numel() for p in subject.model.parameters()),
        **{f"{key}_from": value for key, value in subject.notes.items()},
    }
    return ValidationReport(subject.name, results, chosen_tiers, environment)


def _noting(
    progress: ProgressFn | None, index: int, total: int, name: str
) -> Callable[[str], None] | None:
    """A check's ``note(text)``, reported as ``name: text`` at the check's place."""
    if progress is None:
        return None
    report = progress

    def note(text: str) -> None:
        report(index, total, f"{name}: {text}")

    return note


def _run_one(name: str, tier: int, fn: Any, context: CheckContext) -> CheckResult:
    started = time.perf_counter()
    torch.manual_seed(context.seed)
    try:
        outcome = fn(context)
    except SkipCheck as skip:
        return CheckResult(
            name, tier, "skip", None, None, str(skip), {}, time.perf_counter() - started
        )
    except Exception as error:
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return CheckResult(
            name,
            tier,
            "error",
            None,
            None,
            f"The check crashed: {last}",
            {"traceback": traceback.format_exc(limit=8)},
            time.perf_counter() - started,
        )
    return CheckResult(
        name,
        tier,
        outcome.status,
        outcome.value,
        outcome.threshold,
        outcome.message,
        outcome.details,
        time.perf_counter() - started,
    )
