"""The checks, registered by tier: each is a function of a ``CheckContext`` that returns an
``Outcome`` (or raises ``SkipCheck`` with the reason it does not apply). The runner adds the
name, tier and time, and turns a crash into an ``error`` result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tzoo.validation.report import Status
from tzoo.validation.subject import Subject


class SkipCheck(Exception):
    """The check does not apply to this model (the message says why)."""


@dataclass(frozen=True)
class Outcome:
    status: Status
    value: Any
    threshold: Any
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationOptions:
    """Sizes, budgets and where tier 3 writes. Defaults keep tiers 1 and 2 to seconds on
    a small model on a CPU."""

    batch_sizes: tuple[int, ...] = (1, 2, 4)
    seq_lengths: tuple[int, ...] = (1, 8, 32, 128)
    atol: float = 1e-4  # equalities in float32 (batch, padding, causality, save/load)
    latency_runs: int = 10
    ig_steps: int = 32
    finetune_steps: int = 30
    overfit_steps: int = 200
    optuna_trials: int = 4
    output_dir: Path | None = None  # tier 3's CSV and configs; None: a temporary folder
    wandb_project: str | None = None  # log fine-tuning to Weights & Biases when set
    extra: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[str], None]


@dataclass
class CheckContext:
    subject: Subject
    options: ValidationOptions
    seed: int = 0
    progress: ProgressFn | None = None

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh generator: every check draws the same inputs on every run."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def ids(self, batch: int, length: int, offset: int = 0) -> torch.Tensor:
        return self.subject.random_ids(batch, self.subject.longest(length), self.generator(offset))

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)


CheckFn = Callable[[CheckContext], Outcome]


@dataclass(frozen=True)
class CheckSpec:
    name: str
    tier: int
    fn: CheckFn
    description: str


_CHECKS: dict[str, CheckSpec] = {}


def register(name: str, tier: int) -> Callable[[CheckFn], CheckFn]:
    """Register ``fn`` as check ``name`` of ``tier``; its docstring's first line is the
    description listed by ``tzoo validate --list``."""

    def decorate(fn: CheckFn) -> CheckFn:
        if name in _CHECKS:
            raise ValueError(f"A check named {name!r} is registered already.")
        doc = (fn.__doc__ or "").strip().splitlines()
        _CHECKS[name] = CheckSpec(name, tier, fn, doc[0] if doc else "")
        return fn

    return decorate


def registered() -> list[CheckSpec]:
    """Every check, by tier, in registration order within a tier."""
    _load_builtin_checks()
    return sorted(_CHECKS.values(), key=lambda spec: spec.tier)


def _load_builtin_checks() -> None:
    from importlib import import_module

    for module in ("tier1", "tier2", "tier3", "tier4"):
        try:
            import_module(f"tzoo.validation.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"tzoo.validation.{module}":
                raise
