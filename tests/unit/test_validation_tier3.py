"""Tier 3: training checks and the training library behind them, on TinyCausalLM and the
tiny HF models: well-formed models learn, models that cannot learn are caught, metrics
reach the CSV, seeds reproduce, Optuna prunes and frees memory, and the model under test
is never changed."""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import types
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from tzoo_testing import make_settings
from validation_zoo import VOCAB, TinyCausalLM, tiny_causal_lm

from tzoo.runtime.manager import ModelManager
from tzoo.validation import Subject, ValidationOptions, load_subject, subject_from_module, validate
from tzoo.validation.training import (
    CSV_COLUMNS,
    OVERFIT_CONFIG,
    BenchmarkTask,
    LMData,
    TrainingConfig,
    WandbUnavailableError,
    benchmark_tasks,
    byte_ids,
    chance_accuracy,
    finetune,
    free_memory,
    optuna_search,
    overfit_one_batch,
    run_benchmarks,
    seeded,
    set_seed,
)

TIER3 = ["overfit_one_batch", "finetune", "hyperparameter_search", "benchmarks", "config_roundtrip"]
SMALL = {"benchmark_steps": 120, "search_steps": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("tier3")))


def hf(manager: ModelManager, name: str) -> Subject:
    return load_subject(name, manager=manager)


def options(tmp_path: Path, **changes: Any) -> ValidationOptions:
    extra = {**SMALL, **changes.pop("extra", {})}
    values: dict[str, Any] = {
        "finetune_steps": 12,
        "optuna_trials": 3,
        "output_dir": tmp_path / "out",
        "extra": extra,
    }
    return ValidationOptions(**{**values, **changes})


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- models that cannot learn, or learn unreproducibly -----------------------------------------


class ConstantLM(nn.Module):
    """Logits are a learned bias that ignores the input: it can learn the unigram
    distribution and nothing else."""

    def __init__(self, vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)  # for the vocab size; never used
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.bias.expand(*input_ids.shape, -1)


_UNSEEDED = torch.Generator()  # seeded from the OS below, out of set_seed's reach
_UNSEEDED.seed()


class UnseededNoiseLM(TinyCausalLM):
    """Adds training noise from a generator no seeding reaches (and no deep copy resets):
    training runs with the same seed differ."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = super().forward(input_ids, attention_mask)
        if not self.training:
            return logits
        return logits + torch.randn(logits.shape, generator=_UNSEEDED)


class NanWhenTrainingLM(TinyCausalLM):
    """Fine in eval mode, NaN in train mode (a bad dropout, say)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = super().forward(input_ids, attention_mask)
        return logits * math.nan if self.training else logits


class TrackedLM(TinyCausalLM):
    """Remembers every live instance, deep copies included (``copy.deepcopy`` creates them
    through ``__new__``)."""

    live: ClassVar[weakref.WeakSet[TrackedLM]] = weakref.WeakSet()

    def __new__(cls, *args: Any, **kwargs: Any) -> TrackedLM:
        instance = super().__new__(cls)
        cls.live.add(instance)
        return instance


# -- overfitting one batch ---------------------------------------------------------------------


def test_overfit_passes_on_tiny_causal_lm() -> None:
    model = tiny_causal_lm()
    before = weights(model)
    result = overfit_one_batch(model)
    assert result.passed, result
    assert result.loss_drop > 0.9 and result.reproduced_fraction == 1.0
    assert result.final_loss < 0.1 * result.initial_loss
    assert "token t+1" in result.compared  # says what was compared
    assert same_weights(before, weights(model))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert-mlm", "tiny-t5"])
def test_overfit_check_passes_on_hf_models(manager: ModelManager, name: str) -> None:
    subject = hf(manager, name)
    before = weights(subject.model)
    result = validate(subject, tiers=(3,), checks=["overfit_one_batch"])["overfit_one_batch"]
    assert result.status == "pass", result.message
    assert result.value["loss_drop"] > 0.9 and result.value["reproduced_fraction"] == 1.0
    assert result.threshold == {"loss_drop": "> 0.9", "reproduced_fraction": 1.0}
    masked = subject.kind != "decoder"
    assert ("masked positions" in result.details["compared"]) == masked
    assert same_weights(before, weights(subject.model))


def test_a_model_that_ignores_its_input_fails_overfit() -> None:
    direct = overfit_one_batch(ConstantLM())
    assert not direct.passed and direct.loss_drop < 0.5 and direct.reproduced_fraction < 0.5
    result = validate(ConstantLM(), tiers=(3,), checks=["overfit_one_batch"])
    check = result["overfit_one_batch"]
    assert check.status == "fail"
    assert "the loss fell only" in check.message and "does not reproduce" in check.message


def test_learning_rate_zero_fails_overfit(tmp_path: Path) -> None:
    result = overfit_one_batch(tiny_causal_lm(), OVERFIT_CONFIG.replace(lr=0.0, steps=20))
    assert result.loss_drop == pytest.approx(0.0, abs=1e-6) and not result.passed
    report = validate(
        tiny_causal_lm(),
        tiers=(3,),
        checks=["overfit_one_batch"],
        options=options(tmp_path, overfit_steps=20, extra={"overfit_lr": 0.0}),
    )
    assert report["overfit_one_batch"].status == "fail"


# -- fine-tuning, CSV and wandb ----------------------------------------------------------------


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("which", ["tiny", "tiny-gpt2"])
def test_finetune_writes_one_finite_csv_row_per_step(
    manager: ModelManager, tmp_path: Path, which: str
) -> None:
    subject = subject_from_module(tiny_causal_lm()) if which == "tiny" else hf(manager, which)
    before = weights(subject.model)
    config = TrainingConfig(steps=15, batch_size=4, seq_len=16, warmup=3, scheduler="cosine")
    result = finetune(subject, None, config, csv_path=tmp_path / "run.csv")
    header, rows = read_csv(tmp_path / "run.csv")
    assert header == list(CSV_COLUMNS)
    assert [int(r["step"]) for r in rows] == list(range(1, 16)) == [m.step for m in result.history]
    for row in rows:
        assert all(math.isfinite(float(row[c])) for c in CSV_COLUMNS), row
        assert float(row["perplexity"]) == pytest.approx(math.exp(float(row["loss"])), rel=1e-6)
        assert 0 <= float(row["token_accuracy"]) <= 1 and float(row["grad_norm"]) > 0
    rates = [float(r["learning_rate"]) for r in rows]
    assert rates[0] < rates[1] < rates[3] == pytest.approx(config.lr)  # warm-up
    assert rates[-1] < rates[-2] < rates[3]  # then cosine decay
    assert result.final.loss < result.initial.loss and math.isfinite(result.final.perplexity)
    assert same_weights(before, weights(subject.model))


def test_finetune_check_reports_metrics_and_csv_path(tmp_path: Path) -> None:
    progress: list[str] = []
    report = validate(
        tiny_causal_lm(),
        tiers=(3,),
        checks=["finetune"],
        options=options(tmp_path),
        progress=lambda done, total, text: progress.append(text),
    )
    result = report["finetune"]
    assert result.status == "pass", result.message
    csv_path = Path(result.details["csv"])
    assert csv_path.parent == tmp_path / "out" and str(csv_path) in result.message
    assert len(read_csv(csv_path)[1]) == 12 == len(result.details["history"])
    assert result.value["heldout_loss"] < result.threshold["heldout_loss_below"]
    saved = TrainingConfig.load(result.details["config"])
    assert saved.steps == 12 and saved.seed == 0
    assert any(text.startswith("finetune: step") for text in progress)


def test_finetune_check_fails_on_nan_and_on_a_loss_that_does_not_fall(tmp_path: Path) -> None:
    nan = validate(NanWhenTrainingLM(), tiers=(3,), checks=["finetune"], options=options(tmp_path))
    assert nan["finetune"].status == "fail"
    assert "non-finite at step 1" in nan["finetune"].message
    frozen = options(tmp_path, extra={"training_config": {"lr": 0.0}})
    flat = validate(tiny_causal_lm(), tiers=(3,), checks=["finetune"], options=frozen)
    assert flat["finetune"].status == "fail"
    assert "did not lower the loss" in flat["finetune"].message


def test_wandb_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(WandbUnavailableError, match=r"needs the wandb package.*pip install wandb"):
        finetune(tiny_causal_lm(), csv_path=tmp_path / "x.csv", wandb_project="p")
    assert not (tmp_path / "x.csv").exists()  # refused before training
    report = validate(
        tiny_causal_lm(),
        tiers=(3,),
        checks=["finetune"],
        options=options(tmp_path, wandb_project="my-project"),
    )
    result = report["finetune"]
    assert result.status == "error" and "wandb_project='my-project'" in result.message
    assert "pip install wandb" in result.message and "crashed" not in result.message


def test_wandb_gets_every_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    logged: list[tuple[dict[str, float], int]] = []
    calls: dict[str, Any] = {}

    class Run:
        summary: ClassVar[dict[str, float]] = {}

        def log(self, data: dict[str, float], step: int) -> None:
            logged.append((data, step))

        def finish(self) -> None:
            calls["finished"] = True

    def init(**kwargs: Any) -> Run:
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = TrainingConfig(steps=5, batch_size=2, seq_len=8)
    finetune(tiny_causal_lm(), None, config, wandb_project="proj")
    assert calls["init"]["project"] == "proj" and calls["init"]["config"] == config.to_dict()
    assert [step for _, step in logged] == [1, 2, 3, 4, 5] and calls["finished"]
    assert set(logged[0][0]) == set(CSV_COLUMNS) - {"step"}
    assert "heldout_loss" in Run.summary


# -- seeds and configs -------------------------------------------------------------------------


def test_same_seed_same_history_other_seed_not() -> None:
    model = tiny_causal_lm()
    config = TrainingConfig(steps=6, batch_size=4, seq_len=16)

    def losses(cfg: TrainingConfig) -> list[tuple[float, float]]:
        return [(m.loss, m.grad_norm) for m in finetune(model, None, cfg).history]

    first = losses(config)
    assert losses(config) == first
    assert losses(config.replace(seed=1)) != first


def test_seed_records_and_restores_random_state() -> None:
    record = set_seed(5)
    assert record.seed == 5 and record.python and record.numpy and record.torch
    assert record.cuda_devices == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(1).item(), random.random())
    torch.manual_seed(123)
    random.seed(123)
    with seeded(7):
        inside = torch.rand(1).item()
    with seeded(7):
        assert torch.rand(1).item() == inside
    assert (torch.rand(1).item(), random.random()) == expected  # the caller's stream goes on


def test_config_save_load_and_diff(tmp_path: Path) -> None:
    config = TrainingConfig(lr=3e-4, warmup=5, scheduler="linear", betas=(0.8, 0.95))
    path = config.save(tmp_path / "cfg" / "train.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["betas"] == [0.8, 0.95]
    loaded = TrainingConfig.load(path)
    assert loaded == config and loaded.diff(config) == {}
    other = config.replace(lr=1e-3, seed=4)
    assert config.diff(other) == {"lr": (3e-4, 1e-3), "seed": (0, 4)}
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        TrainingConfig.load(path)
    path.write_text(json.dumps({**data, "learning_rate": 1}))
    with pytest.raises(ValueError, match="Unknown training config keys: learning_rate"):
        TrainingConfig.load(path)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        TrainingConfig(scheduler="step")


def test_config_roundtrip_check_passes_and_catches_unseeded_randomness(tmp_path: Path) -> None:
    good = validate(
        tiny_causal_lm(), tiers=(3,), checks=["config_roundtrip"], options=options(tmp_path)
    )
    result = good["config_roundtrip"]
    assert result.status == "pass", result.message
    assert result.value == {"roundtrip_equal": True, "loss_difference": 0.0}
    assert result.details["other_seed_differs"]
    assert TrainingConfig.load(result.details["path"]) == TrainingConfig(steps=3)
    bad = validate(
        UnseededNoiseLM(), tiers=(3,), checks=["config_roundtrip"], options=options(tmp_path)
    )
    assert bad["config_roundtrip"].status == "fail"
    assert "not seeded" in bad["config_roundtrip"].message


# -- Optuna ------------------------------------------------------------------------------------


def test_median_pruner_prunes_a_huge_learning_rate_and_memory_is_freed() -> None:
    TrackedLM.live.clear()
    torch.manual_seed(0)
    model = TrackedLM().eval()
    live_after_cleanup: list[int] = []

    def cleanup() -> None:
        free_memory()
        live_after_cleanup.append(len(TrackedLM.live))

    config = TrainingConfig(steps=10, batch_size=4, seq_len=16)
    result = optuna_search(
        model,
        None,
        config,
        n_trials=4,
        lr_range=(1e-4, 100.0),
        weight_decay_range=None,
        enqueue=[{"lr": 3e-3}, {"lr": 1e-2}, {"lr": 50.0}, {"lr": 1e-3}],
        cleanup=cleanup,
    )
    states = [t.state for t in result.trials]
    assert states[:2] == ["COMPLETE", "COMPLETE"] and states[2] == "PRUNED", result.trials
    huge = result.trials[2]
    assert huge.params == {"lr": 50.0} and huge.last_step is not None and huge.last_step < 10
    assert result.pruner == "MedianPruner" and result.best_params is not None
    assert result.best_params["lr"] < 1 and result.best_value is not None
    # Cleanup ran after every trial, and by then no trial's copy was alive: only ours.
    assert live_after_cleanup == [1, 1, 1, 1]
    assert len(result.trials[0].intermediate) == 10  # every step reported to the pruner


def test_search_check_and_missing_optuna(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    report = validate(
        tiny_causal_lm(), tiers=(3,), checks=["hyperparameter_search"], options=options(tmp_path)
    )
    result = report["hyperparameter_search"]
    assert result.status == "pass", result.message
    assert len(result.details["trials"]) == 3 and result.details["pruner"] == "MedianPruner"
    assert set(result.value["best_params"]) == {"lr", "weight_decay"}
    monkeypatch.setitem(sys.modules, "optuna", None)
    skipped = validate(
        tiny_causal_lm(), tiers=(3,), checks=["hyperparameter_search"], options=options(tmp_path)
    )["hyperparameter_search"]
    assert skipped.status == "skip" and "pip install optuna" in skipped.message


# -- benchmarks --------------------------------------------------------------------------------


def test_shipped_tasks_load_and_map_into_any_vocabulary() -> None:
    tasks = {t.name: t for t in benchmark_tasks()}
    assert {"copy", "reversal", "sorting", "corpus_next_byte", "modular_addition"} <= set(tasks)
    assert not tasks["modular_addition"].default
    subject = subject_from_module(tiny_causal_lm())
    data = tasks["reversal"].data(subject)
    assert data.train.shape == (384, 9) and data.heldout.shape == (96, 9)
    assert int(data.train.min()) >= 1 and int(data.train.max()) < VOCAB
    assert data.train_scored is not None and data.train_scored[:, 5:].all()
    assert not data.train_scored[:, :5].any()
    tiny_vocab = subject_from_module(tiny_causal_lm(vocab_size=6))
    with pytest.raises(ValueError, match="needs 9 token ids"):
        tasks["copy"].data(tiny_vocab)
    assert byte_ids(b"\x00\xff", 1, 6).tolist() == [1, 1 + 255 % 5]  # folded into 5 ids
    with pytest.raises(ValueError, match="one prompt and answer length"):
        BenchmarkTask.from_dict(
            {
                "version": 1,
                "name": "x",
                "symbols": "ab",
                "train": [["a", "b"]],
                "test": [["ab", "b"]],
            }
        )


def test_chance_is_the_best_input_blind_guess() -> None:
    subject = subject_from_module(tiny_causal_lm())
    train = torch.tensor([[1, 2, 5], [1, 2, 5], [1, 3, 6]])
    test = torch.tensor([[1, 2, 5], [1, 3, 7]])
    scored = torch.tensor([[False, False, True]] * 3)
    data = LMData(train, test, scored, scored[:2])
    assert chance_accuracy(subject, data) == (0.5, 2)  # guesses 5 at the answer


def test_benchmarks_beat_chance_and_a_blind_model_warns(tmp_path: Path) -> None:
    results = run_benchmarks(tiny_causal_lm(), tasks=["copy", "reversal"])
    assert [r.task for r in results] == ["copy", "reversal"]
    for r in results:
        assert r.above_chance and r.accuracy is not None and r.accuracy > 0.9, r
        assert r.chance is not None and 0.1 < r.chance < 0.2 and r.tokens == 384
    report = validate(
        ConstantLM(),
        tiers=(3,),
        checks=["benchmarks"],
        options=options(tmp_path, extra={"benchmark_tasks": ["copy", "sorting"]}),
    )
    result = report["benchmarks"]
    assert result.status == "warn" and "At chance" in result.message
    assert set(result.value) == {"copy", "sorting"}
    for task in result.details["tasks"]:
        assert not task["above_chance"]
        assert task["accuracy"] <= task["chance"] + task["margin"]


def test_benchmarks_check_on_tiny_gpt2(manager: ModelManager, tmp_path: Path) -> None:
    report = validate(
        hf(manager, "tiny-gpt2"), tiers=(3,), checks=["benchmarks"], options=options(tmp_path)
    )
    result = report["benchmarks"]
    assert result.status == "pass", result.message
    assert set(result.value) == {"copy", "corpus_next_byte", "reversal", "sorting"}
    assert all(result.value[t] > result.threshold[t] for t in result.value)


# -- the whole tier ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "tiny-gpt2"])
def test_every_tier3_check_passes_and_leaves_the_model_untouched(
    manager: ModelManager, tmp_path: Path, which: str
) -> None:
    subject = subject_from_module(tiny_causal_lm()) if which == "tiny" else hf(manager, which)
    before = weights(subject.model)
    grads = [p.requires_grad for p in subject.model.parameters()]
    notes: list[str] = []
    extra = {"benchmark_tasks": ["copy"]}
    report = validate(
        subject,
        tiers=(3,),
        options=options(tmp_path, extra=extra),
        progress=lambda done, total, text: notes.append(text),
    )
    assert report.names() == TIER3
    assert {r.name: r.status for r in report.results} == dict.fromkeys(TIER3, "pass"), [
        (r.name, r.message) for r in report.results if r.status != "pass"
    ]
    assert same_weights(before, weights(subject.model))
    assert [p.requires_grad for p in subject.model.parameters()] == grads
    assert not subject.model.training
    assert any(n.startswith("hyperparameter_search: trial") for n in notes)
    assert any(n.startswith("benchmarks: task") for n in notes)
    json.dumps(report.to_dict(), allow_nan=False)  # every value is strict JSON


def test_a_bare_encoder_without_lm_head_is_skipped(manager: ModelManager) -> None:
    report = validate(hf(manager, "tiny-bert"), tiers=(3,), checks=["overfit_one_batch"])
    result = report["overfit_one_batch"]
    assert result.status == "skip" and "no language-model head" in result.message
