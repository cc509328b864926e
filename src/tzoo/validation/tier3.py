"""Tier 3: can the model learn? Each check trains a copy (``training``), so the model under
test keeps its weights.

- ``overfit_one_batch``: loss on one fixed batch falls > 90% and argmax decoding then
  reproduces the batch.
- ``finetune``: a short fine-tuning on the shipped corpus with per-step metrics in a CSV
  (and Weights & Biases when ``options.wandb_project`` is set); the held-out loss must fall.
- ``hyperparameter_search``: an Optuna study over learning rate and weight decay with a
  MedianPruner.
- ``benchmarks``: accuracy on the small offline tasks against a chance baseline.
- ``config_roundtrip``: the training config saves and loads identically, and its seed
  reproduces the same losses.

``options.extra`` may set ``training_config`` (a TrainingConfig, a mapping of its fields,
or a JSON file saved by it: the base of fine-tuning, search and round trip),
``overfit_lr``, ``search_steps``, ``benchmark_steps`` and ``benchmark_tasks`` (names).
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tzoo.validation.registry import CheckContext, Outcome, SkipCheck, register
from tzoo.validation.training import (
    BENCHMARK_CONFIG,
    OVERFIT_CONFIG,
    TrainingConfig,
    WandbUnavailableError,
    as_lm_data,
    finetune,
    optuna_search,
    overfit_one_batch,
    run_benchmarks,
    seeded,
    train_steps,
    training_copy,
)

OVERFIT_DROP = 0.9  # the loss must fall by more than this fraction of its first value
REPRODUCE_STEPS = 3  # config_roundtrip compares the losses of this many steps
REPRODUCE_TOLERANCE = 1e-6  # relative: identical on a CPU; GPU kernels may differ in the last bits


def _require_lm_head(ctx: CheckContext) -> None:
    """Skip a model whose output is not vocabulary logits (a bare encoder's hidden states):
    there is no language-modelling objective to train it on."""
    with torch.no_grad():
        logits = ctx.subject.logits(ctx.ids(1, 4, offset=301))
    if logits.dim() != 3 or logits.shape[-1] < ctx.subject.vocab_size:
        raise SkipCheck(
            f"The model returns {tuple(logits.shape)}, not (batch, length, vocab_size="
            f"{ctx.subject.vocab_size}) logits: it has no language-model head to train."
        )


def _base_config(ctx: CheckContext) -> TrainingConfig:
    given = ctx.options.extra.get("training_config")
    if given is None:
        config = TrainingConfig()
    elif isinstance(given, TrainingConfig):
        config = given
    elif isinstance(given, Mapping):
        config = TrainingConfig.from_dict({"version": 1, **given})
    else:
        config = TrainingConfig.load(given)
    return config.replace(seed=ctx.seed)


def _output_dir(ctx: CheckContext) -> Path:
    if ctx.options.output_dir is not None:
        folder = Path(ctx.options.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return Path(tempfile.mkdtemp(prefix="tzoo-validate-"))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


@register("overfit_one_batch", tier=3)
def check_overfit_one_batch(ctx: CheckContext) -> Outcome:
    """Overfit one fixed batch: the loss falls > 90% and argmax decoding reproduces it."""
    _require_lm_head(ctx)
    config = OVERFIT_CONFIG.replace(
        steps=ctx.options.overfit_steps,
        seed=ctx.seed,
        lr=float(ctx.options.extra.get("overfit_lr", OVERFIT_CONFIG.lr)),
    )
    result = overfit_one_batch(ctx.subject, config, target_drop=OVERFIT_DROP, progress=ctx.note)
    value = {"loss_drop": result.loss_drop, "reproduced_fraction": result.reproduced_fraction}
    threshold = {"loss_drop": f"> {OVERFIT_DROP}", "reproduced_fraction": 1.0}
    details = {
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "steps": result.steps,
        "max_steps": config.steps,
        "compared": result.compared,
        "config": config.to_dict(),
        "losses": result.losses,
    }
    summary = (
        f"loss {result.initial_loss:.4g} -> {result.final_loss:.4g} "
        f"({result.loss_drop:.1%} lower) in {result.steps} steps; "
        f"{result.reproduced_fraction:.1%} of the batch reproduced ({result.compared})"
    )
    if result.passed:
        return Outcome("pass", value, threshold, f"Overfits one batch: {summary}.", details)
    why = []
    if not result.loss_drop > OVERFIT_DROP:
        why.append(f"the loss fell only {result.loss_drop:.1%} in {config.steps} steps")
    if not result.reproduced:
        why.append("decoding does not reproduce the batch")
    return Outcome(
        "fail",
        value,
        threshold,
        f"Cannot overfit one batch ({'; '.join(why)}): {summary}. A model that cannot memorise "
        "a handful of tokens has a bug (outputs that ignore the input, frozen or detached "
        "parameters, a broken loss path).",
        details,
    )


@register("finetune", tier=3)
def check_finetune(ctx: CheckContext) -> Outcome:
    """Fine-tune on the shipped corpus: the held-out loss falls, per-step metrics in a CSV."""
    _require_lm_head(ctx)
    config = _base_config(ctx).replace(steps=ctx.options.finetune_steps)
    folder = _output_dir(ctx)
    stem = f"finetune-{_slug(ctx.subject.name)}"
    config_path = config.save(folder / f"{stem}-config.json")
    csv_path = folder / f"{stem}.csv"
    try:
        result = finetune(
            ctx.subject,
            None,
            config,
            csv_path=csv_path,
            wandb_project=ctx.options.wandb_project,
            progress=ctx.note,
        )
    except WandbUnavailableError as error:
        return Outcome("error", None, None, str(error), {"config": str(config_path)})
    before, after = result.initial, result.final
    value = {
        "heldout_loss": after.loss,
        "heldout_perplexity": after.perplexity,
        "heldout_accuracy": after.accuracy,
    }
    threshold = {"heldout_loss_below": before.loss, "finite": True}
    details = {
        "csv": str(csv_path),
        "config": str(config_path),
        "data": result.data_source,
        "heldout_before": before.to_dict(),
        "heldout_after": after.to_dict(),
        "history": [m.to_dict() for m in result.history],
        "seeds": result.seeds.to_dict(),
        "wandb_project": ctx.options.wandb_project,
    }
    diverged = result.diverged_at
    if diverged is not None or not math.isfinite(after.loss):
        where = f"at step {diverged}" if diverged is not None else "on held-out data"
        return Outcome(
            "fail",
            value,
            threshold,
            f"The loss became non-finite {where} (lr {config.lr:g}); metrics in {csv_path}.",
            details,
        )
    change = f"held-out loss {before.loss:.4g} -> {after.loss:.4g} in {len(result.history)} steps"
    if not after.loss < before.loss:
        return Outcome(
            "fail",
            value,
            threshold,
            f"Fine-tuning did not lower the loss: {change}; metrics in {csv_path}.",
            details,
        )
    return Outcome(
        "pass",
        value,
        threshold,
        f"Fine-tunes: {change}, perplexity {after.perplexity:.4g}, token accuracy "
        f"{after.accuracy:.1%}; metrics in {csv_path}.",
        details,
    )


@register("hyperparameter_search", tier=3)
def check_hyperparameter_search(ctx: CheckContext) -> Outcome:
    """Optuna search over learning rate and weight decay with a MedianPruner."""
    _require_lm_head(ctx)
    steps = int(ctx.options.extra.get("search_steps", ctx.options.finetune_steps))
    config = _base_config(ctx).replace(steps=steps)
    trials = ctx.options.optuna_trials
    try:
        result = optuna_search(ctx.subject, None, config, n_trials=trials, progress=ctx.note)
    except ImportError as error:
        raise SkipCheck(str(error)) from None
    states = [t.state for t in result.trials]
    value = {"best_heldout_loss": result.best_value, "best_params": result.best_params}
    threshold = {"completed_finite_trials_min": 1}
    details = {
        "trials": [t.to_dict() for t in result.trials],
        "pruner": result.pruner,
        "steps_per_trial": steps,
        "pruned": len(result.pruned),
    }
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
    if result.best_value is None or not math.isfinite(result.best_value):
        return Outcome(
            "fail",
            value,
            threshold,
            f"No trial of {trials} trained to a finite loss ({counts}).",
            details,
        )
    params = ", ".join(f"{k} {v:.3g}" for k, v in (result.best_params or {}).items())
    return Outcome(
        "pass",
        value,
        threshold,
        f"Best of {trials} trials ({counts}): held-out loss {result.best_value:.4g} with {params}.",
        details,
    )


@register("benchmarks", tier=3)
def check_benchmarks(ctx: CheckContext) -> Outcome:
    """Accuracy on the small offline benchmark tasks after brief training, against chance."""
    _require_lm_head(ctx)
    steps = int(ctx.options.extra.get("benchmark_steps", BENCHMARK_CONFIG.steps))
    tasks = ctx.options.extra.get("benchmark_tasks")
    config = BENCHMARK_CONFIG.replace(steps=steps, seed=ctx.seed)
    results = run_benchmarks(ctx.subject, tasks=tasks, config=config, progress=ctx.note)
    ran = [r for r in results if r.skipped is None]
    details = {"tasks": [r.to_dict() for r in results], "config": config.to_dict()}
    if not ran:
        raise SkipCheck(
            "No benchmark task fits this model: "
            + "; ".join(f"{r.task}: {r.skipped}" for r in results)
        )
    value = {r.task: r.accuracy for r in ran}
    threshold = {r.task: (r.chance or 0.0) + (r.margin or 0.0) for r in ran}
    scores = ", ".join(f"{r.task} {r.accuracy:.1%} (chance {r.chance:.1%})" for r in ran)
    at_chance = [r.task for r in ran if not r.above_chance]
    skipped = [f"{r.task} ({r.skipped})" for r in results if r.skipped is not None]
    tail = f"; skipped {', '.join(skipped)}" if skipped else ""
    if at_chance:
        return Outcome(
            "warn",
            value,
            threshold,
            f"At chance after {steps} steps on {', '.join(at_chance)}: {scores}{tail}.",
            details,
        )
    return Outcome(
        "pass", value, threshold, f"Above chance on every task: {scores}{tail}.", details
    )


@register("config_roundtrip", tier=3)
def check_config_roundtrip(ctx: CheckContext) -> Outcome:
    """The training config saves and loads identically; its seed reproduces the losses."""
    _require_lm_head(ctx)
    config = _base_config(ctx).replace(steps=REPRODUCE_STEPS)
    path = config.save(_output_dir(ctx) / f"training-config-{_slug(ctx.subject.name)}.json")
    loaded = type(config).load(path)
    differences = config.diff(loaded)
    data = as_lm_data(None, ctx.subject, config)

    def losses(cfg: TrainingConfig) -> list[float]:
        with seeded(cfg.seed):
            model = training_copy(ctx.subject)
            history = train_steps(ctx.subject, model, data, cfg)
            del model
        return [m.loss for m in history]

    first, again = losses(config), losses(loaded)
    other = losses(config.replace(seed=config.seed + 1))
    gap = max(
        (abs(a - b) / max(1.0, abs(a)) for a, b in zip(first, again, strict=True)),
        default=math.inf,
    )
    if len(first) != len(again) or any(math.isnan(x) for x in first + again):
        gap = math.inf
    value = {"roundtrip_equal": loaded == config, "loss_difference": gap}
    threshold = {"roundtrip_equal": True, "loss_difference_max": REPRODUCE_TOLERANCE}
    details: dict[str, Any] = {
        "path": str(path),
        "differences": {k: list(v) for k, v in differences.items()},
        "losses": first,
        "losses_reloaded": again,
        "losses_other_seed": other,
        "other_seed_differs": other != first,
    }
    problems = []
    if loaded != config or differences:
        problems.append(f"the reloaded config differs in {', '.join(differences) or 'type'}")
    if not gap <= REPRODUCE_TOLERANCE:
        problems.append(
            f"the same seed gave different losses over {REPRODUCE_STEPS} steps "
            f"(relative difference {gap:.3g}): the model draws randomness that is not seeded"
        )
    if problems:
        return Outcome("fail", value, threshold, "; ".join(problems).capitalize() + ".", details)
    return Outcome(
        "pass",
        value,
        threshold,
        f"The config round-trips through {path.name}, and seed {config.seed} reproduces the "
        f"losses of {REPRODUCE_STEPS} steps (relative difference {gap:.2g})"
        + ("" if other != first else " (another seed gave the same losses too)")
        + ".",
        details,
    )
