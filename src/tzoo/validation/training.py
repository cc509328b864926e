"""Training a user's model for tier 3, as a library: versioned training configs, seed
management, fine-tuning with per-step metrics (CSV, optionally Weights & Biases), overfitting
one batch, an Optuna search and small offline benchmark tasks.

Everything trains a *copy* of the model (float32, on the model's device): the model you pass
keeps its weights, its mode and the global random state.

The objective follows the model's kind:

- decoder: next-token prediction, the logits at position t scored against the token at t+1;
- encoder: masked tokens, the scored tokens replaced by a mask token and predicted in place;
- encoder-decoder: denoising, the encoder reads the sequence with the scored tokens masked
  and the decoder, teacher-forced on the original shifted right, predicts the original at
  the scored positions.

For language-model data every position is scored for a decoder; for the others a random
``mask_fraction`` of positions (at least one a row) is drawn per batch. Task data (the
benchmarks) scores only the answer tokens.

A user's model has no tokenizer, so the data is token ids within its vocabulary: text is
taken at the byte level (``byte_ids``), shifted above the pad id; task symbols are numbered
from there too.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gc
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tzoo.validation.subject import Subject, subject_from_module

CONFIG_VERSION = 1
SCHEDULERS = ("constant", "linear", "cosine")
CSV_COLUMNS = (
    "step",
    "loss",
    "perplexity",
    "token_accuracy",
    "learning_rate",
    "grad_norm",
    "seconds",
)
ProgressFn = Callable[[str], None]


class WandbUnavailableError(ImportError):
    """Logging to Weights & Biases was asked for and the ``wandb`` package is missing."""


class OptunaUnavailableError(ImportError):
    """A hyperparameter search was asked for and the ``optuna`` package is missing."""


# -- configs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingConfig:
    """How to train: optimiser (AdamW), schedule, batches, seed. Saved as JSON with a
    ``version``; ``diff`` says what two configs do differently."""

    lr: float = 1e-3
    steps: int = 30
    batch_size: int = 8
    seq_len: int = 32  # rows cut from the shipped corpus (given rows keep their length)
    weight_decay: float = 0.0
    warmup: int = 0  # steps of linear warm-up from 0 before the schedule
    scheduler: str = "constant"  # after warm-up: constant, linear (to 0) or cosine (to 0)
    seed: int = 0
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    mask_fraction: float = 0.15  # encoders and encoder-decoders on language-model data
    eval_fraction: float = 0.1  # rows held out when the data is one tensor
    eval_batches: int = 8  # held-out evaluation reads at most this many batches

    def __post_init__(self) -> None:
        problems = []
        if not self.lr >= 0:
            problems.append(f"lr must be >= 0 (got {self.lr})")
        for name in ("steps", "batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.seq_len < 2:
            problems.append(f"seq_len must be >= 2 (got {self.seq_len})")
        if self.warmup < 0 or self.weight_decay < 0:
            problems.append("warmup and weight_decay must be >= 0")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}")
        if not 0 < self.mask_fraction <= 1 or not 0 < self.eval_fraction < 1:
            problems.append("mask_fraction must be in (0, 1] and eval_fraction in (0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or None (got {self.grad_clip})")
        if problems:
            raise ValueError("Invalid training config: " + "; ".join(problems) + ".")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def lr_factor(self, step: int) -> float:
        """The learning rate's multiplier at 0-based ``step``."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.scheduler == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        progress = min(1.0, progress)
        if self.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise ValueError(
                f"A training config of version {version!r}; this tzoo reads version "
                f"{CONFIG_VERSION}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise ValueError(f"Unknown training config keys: {', '.join(unknown)}.")
        values = {k: v for k, v in data.items() if k in known}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the training config {path}: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"The training config {path} must be a JSON object.")
        return cls.from_dict(data)

    def diff(self, other: TrainingConfig) -> dict[str, tuple[Any, Any]]:
        """``{field: (this value, other value)}`` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}


# -- seeds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedRecord:
    """What ``set_seed`` seeded."""

    seed: int
    python: bool
    numpy: bool
    torch: bool
    cuda_devices: int  # 0: no CUDA here

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def set_seed(seed: int) -> SeedRecord:
    """Seed Python's ``random``, NumPy's global generator (when NumPy is installed), torch's
    CPU generator and every CUDA device's; return what was seeded."""
    random.seed(seed)
    seeded_numpy = False
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
        seeded_numpy = True
    torch.manual_seed(seed)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda:
        torch.cuda.manual_seed_all(seed)
    return SeedRecord(seed, True, seeded_numpy, True, cuda)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[SeedRecord]:
    """Run the block with every generator seeded by ``seed``; restore their states after,
    so seeding a check never changes what the caller draws next."""
    python_state = random.getstate()
    numpy_state: Any = None
    with contextlib.suppress(ImportError):
        import numpy as np

        numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield set_seed(seed)
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy as np

            np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def free_memory() -> int:
    """Collect garbage (reference cycles keep a finished trial's model alive) and hand
    CUDA's cached blocks back; return the number of objects collected."""
    collected = gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return collected


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMData:
    """Rows of token ids of one length to train (``train``) and evaluate (``heldout``) on.
    ``*_scored`` (bool, same shape) mark the tokens to predict; None: language-model data
    (see the module docstring)."""

    train: Tensor
    heldout: Tensor
    train_scored: Tensor | None = None
    heldout_scored: Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.train.dim() != 2 or self.heldout.dim() != 2:
            raise ValueError("LMData rows must be 2-d tensors of token ids (rows, length).")
        if len(self.train) < 1 or len(self.heldout) < 1:
            raise ValueError("LMData needs at least one training row and one held-out row.")
        if self.train.shape[1] != self.heldout.shape[1]:
            raise ValueError("Training and held-out rows must have the same length.")


def token_range(subject: Subject) -> tuple[int, int]:
    """``[low, high)``: the ids synthetic data uses. Above the pad id (a model may ignore
    its pad token) and, for models that read masks, below the mask id."""
    low = min((subject.pad_token_id or 0) + 1, subject.vocab_size - 1)
    high = subject.vocab_size
    if subject.kind != "decoder" and mask_token_id(subject) == subject.vocab_size - 1:
        high -= 1
    return low, max(high, low + 1)


def mask_token_id(subject: Subject) -> int:
    """The mask token for encoders: the model config's ``mask_token_id``, else the last id
    of the vocabulary (kept out of the data by ``token_range``)."""
    config = getattr(subject.model, "config", None)
    for source in (subject.config, config):
        value = (
            source.get("mask_token_id")
            if isinstance(source, Mapping)
            else getattr(source, "mask_token_id", None)
        )
        if isinstance(value, int) and 0 <= value < subject.vocab_size:
            return value
    return subject.vocab_size - 1


def byte_ids(data: bytes, low: int, high: int) -> Tensor:
    """Bytes as token ids ``low + byte``, folded modulo ``high - low`` when fewer than 256
    ids are free (a tiny vocabulary then merges some bytes)."""
    width = high - low
    values = torch.tensor(list(data), dtype=torch.long)
    return low + (values if width >= 256 else values % width)


def corpus_data(
    subject: Subject,
    seq_len: int,
    *,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    stride: int | None = None,
) -> LMData:
    """The texts shipped with tzoo (``shipped_corpus``) as byte-level rows of ``seq_len``
    (capped at the model's longest input), split by paragraph into train and held-out.
    Training rows start every ``stride`` bytes (default a quarter row: the corpus is small,
    and overlapping windows keep a model from learning rows by heart); held-out rows do
    not overlap."""
    from tzoo.analyses.corpus import shipped_corpus, split_corpus

    length = subject.longest(seq_len)
    step = stride or max(1, length // 4)
    low, high = token_range(subject)
    train_docs, heldout_docs = split_corpus(shipped_corpus(), heldout_fraction, seed)

    def rows(docs: list[str], every: int) -> Tensor:
        ids = byte_ids("\n".join(docs).encode("utf-8"), low, high)
        if len(ids) < length:  # a text shorter than a row: repeat it
            ids = ids.repeat(length // len(ids) + 1)
        return ids.unfold(0, length, every).contiguous()

    return LMData(
        rows(train_docs, step), rows(heldout_docs, length), source="shipped corpus (bytes)"
    )


DataLike = LMData | Tensor | Sequence[Sequence[int]] | None


def as_lm_data(data: DataLike, subject: Subject, config: TrainingConfig) -> LMData:
    """``data`` as LMData: LMData as is; rows of ids (a tensor or lists), the last
    ``config.eval_fraction`` held out; None: the shipped corpus."""
    if data is None:
        return corpus_data(subject, config.seq_len, seed=config.seed)
    if isinstance(data, LMData):
        return data
    rows = data if isinstance(data, Tensor) else torch.tensor([list(r) for r in data])
    if rows.dim() != 2 or len(rows) < 2:
        raise ValueError("Training data must be at least 2 rows of token ids of one length.")
    if int(rows.min()) < 0 or int(rows.max()) >= subject.vocab_size:
        raise ValueError(f"Token ids must be in [0, {subject.vocab_size}) for this model.")
    n_heldout = min(len(rows) - 1, max(1, round(len(rows) * config.eval_fraction)))
    rows = rows.long()
    return LMData(rows[:-n_heldout], rows[-n_heldout:], source="given rows")


# -- the objective -----------------------------------------------------------------------------


def _as_subject(subject_or_model: Subject | nn.Module) -> Subject:
    if isinstance(subject_or_model, Subject):
        return subject_or_model
    return subject_from_module(subject_or_model)


def training_copy(subject: Subject) -> nn.Module:
    """A float32 copy of the model to train (a deep copy; else a fresh model loaded with
    its weights), with every parameter trainable if the model was frozen for inference."""
    try:
        model = copy.deepcopy(subject.model)
    except Exception:
        model = subject.fresh_model()
        model.load_state_dict(subject.model.state_dict())
    if any(p.is_floating_point() and p.element_size() < 4 for p in model.parameters()):
        model = model.float()  # half-precision optimisation is not what these checks test
    if not any(p.requires_grad for p in model.parameters()):
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    return model


def _random_scored(shape: torch.Size, fraction: float, generator: torch.Generator) -> Tensor:
    scored = torch.rand(shape, generator=generator) < fraction
    # At least one scored token a row, so every row gives a loss.
    first = torch.randint(0, shape[1], (shape[0],), generator=generator)
    scored[torch.arange(shape[0]), first] = True
    return scored


def lm_forward(
    subject: Subject, model: nn.Module, ids: Tensor, scored: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, targets, valid) for the model's objective on rows ``ids`` with the tokens
    to predict marked in ``scored``: ``logits[valid]`` is scored against ``targets[valid]``."""
    device = subject.device
    ids, scored = ids.to(device), scored.to(device)
    if subject.kind == "decoder":
        logits = subject.logits(ids, model=model)[:, :-1]
        return logits, ids[:, 1:], scored[:, 1:]
    corrupted = ids.masked_fill(scored, mask_token_id(subject))
    decoder_ids = subject.decoder_inputs(ids) if subject.kind == "encoder-decoder" else None
    logits = subject.logits(corrupted, decoder_input_ids=decoder_ids, model=model)
    return logits, ids, scored


def _loss(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, int, int]:
    """(mean cross-entropy, correct argmax count, token count) over the valid tokens."""
    chosen_logits, chosen_targets = logits[valid], targets[valid]
    loss = F.cross_entropy(chosen_logits.float(), chosen_targets)
    correct = int((chosen_logits.argmax(-1) == chosen_targets).sum())
    return loss, correct, int(chosen_targets.numel())


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows past ~709


class _Batches:
    """Seeded training batches: rows drawn with replacement, with their scored tokens."""

    def __init__(
        self, subject: Subject, data: LMData, config: TrainingConfig, *, whole: bool = False
    ) -> None:
        self.subject, self.data, self.config, self.whole = subject, data, config, whole
        self.generator = torch.Generator().manual_seed(config.seed)

    def next(self) -> tuple[Tensor, Tensor]:
        if self.whole and self.data.train_scored is not None:
            return self.data.train, self.data.train_scored
        rows = torch.randint(
            0, len(self.data.train), (self.config.batch_size,), generator=self.generator
        )
        ids = self.data.train[rows]
        if self.data.train_scored is not None:
            return ids, self.data.train_scored[rows]
        return ids, _lm_scored(self.subject, ids.shape, self.config, self.generator)


def _lm_scored(
    subject: Subject, shape: torch.Size, config: TrainingConfig, generator: torch.Generator
) -> Tensor:
    if subject.kind == "decoder":
        return torch.ones(shape, dtype=torch.bool)
    return _random_scored(shape, config.mask_fraction, generator)


@dataclass(frozen=True)
class StepMetrics:
    """One optimiser step: the loss and accuracy of the batch before the update, the
    learning rate it used and the gradient norm before clipping."""

    step: int
    loss: float
    perplexity: float
    token_accuracy: float
    learning_rate: float
    grad_norm: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvalMetrics:
    loss: float
    perplexity: float
    accuracy: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(
    subject: Subject, model: nn.Module, data: LMData, config: TrainingConfig
) -> EvalMetrics:
    """Mean loss, perplexity and argmax accuracy over the held-out rows (at most
    ``config.eval_batches`` batches), in eval mode, with the same masks every call."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    total_loss, correct, count = 0.0, 0, 0
    try:
        limit = config.eval_batches * config.batch_size
        for start in range(0, min(len(data.heldout), limit), config.batch_size):
            ids = data.heldout[start : start + config.batch_size]
            if data.heldout_scored is not None:
                scored = data.heldout_scored[start : start + config.batch_size]
            else:
                scored = _lm_scored(subject, ids.shape, config, generator)
            logits, targets, valid = lm_forward(subject, model, ids, scored)
            loss, right, n = _loss(logits, targets, valid)
            total_loss += float(loss) * n
            correct, count = correct + right, count + n
    finally:
        model.train(was_training)
    mean = total_loss / max(1, count)
    return EvalMetrics(mean, _perplexity(mean), correct / max(1, count), count)


StepHook = Callable[[StepMetrics], bool | None]  # True: stop, skipping this step's update


def train_steps(
    subject: Subject,
    model: nn.Module,
    data: LMData,
    config: TrainingConfig,
    *,
    on_step: StepHook | None = None,
    train_mode: bool = True,
    whole_batch: bool = False,
) -> list[StepMetrics]:
    """Train ``model`` in place for ``config.steps`` AdamW steps, on seeded random
    batches of the training rows (``whole_batch``: all of them every step, when scored).
    ``on_step`` sees each step's metrics before its update and stops the run by returning
    True (that update is then skipped, as is the update after a non-finite loss).
    ``train_mode=False`` trains in eval mode (dropout off). The optimiser lives only in
    this call, so returning frees its state."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters.")
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    batches = _Batches(subject, data, config, whole=whole_batch)
    model.train(train_mode)
    history: list[StepMetrics] = []
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        ids, scored = batches.next()
        logits, targets, valid = lm_forward(subject, model, ids, scored)
        loss, correct, count = _loss(logits, targets, valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.grad_clip if config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        learning_rate = float(optimizer.param_groups[0]["lr"])
        value = loss.detach().item()
        metrics = StepMetrics(
            step,
            value,
            _perplexity(value),
            correct / max(1, count),
            learning_rate,
            grad_norm,
            time.perf_counter() - started,
        )
        history.append(metrics)
        # Asked before the update, so a model stopped on its metrics is the model measured.
        stop = on_step(metrics) if on_step is not None else False
        if stop or not math.isfinite(value):
            break
        optimizer.step()
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return history


# -- fine-tuning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneResult:
    config: TrainingConfig
    history: list[StepMetrics]
    initial: EvalMetrics  # held-out metrics before training
    final: EvalMetrics  # and after
    csv_path: Path | None
    seeds: SeedRecord
    data_source: str = ""

    @property
    def diverged_at(self) -> int | None:
        """The first step with a non-finite loss, if any."""
        for metrics in self.history:
            if not math.isfinite(metrics.loss):
                return metrics.step
        return None


def _import_wandb(project: str) -> Any:
    """The wandb module, imported only when asked for (it stays an optional dependency)."""
    try:
        import wandb
    except ImportError:
        raise WandbUnavailableError(
            f"Logging to Weights & Biases (wandb_project={project!r}) needs the wandb package, "
            "which is not installed: pip install wandb (then wandb login), or leave "
            "wandb_project unset to log to the CSV file only."
        ) from None
    return wandb


class _CsvLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file: TextIO | None = None
        self.writer: Any = None

    def __enter__(self) -> _CsvLog:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("w", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS)
            self.writer.writeheader()
        return self

    def write(self, metrics: StepMetrics) -> None:
        if self.writer is not None and self.file is not None:
            self.writer.writerow(metrics.to_dict())
            self.file.flush()  # a long run can be followed with tail -f

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def finetune(
    subject_or_model: Subject | nn.Module,
    data: DataLike = None,
    config: TrainingConfig | None = None,
    *,
    csv_path: str | Path | None = None,
    wandb_project: str | None = None,
    progress: ProgressFn | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of the model on ``data`` (default: the shipped corpus, byte level)
    with ``config``, logging every step (loss, perplexity, token accuracy, learning rate,
    gradient norm: ``CSV_COLUMNS``) to ``csv_path`` and, when ``wandb_project`` is set, to
    Weights & Biases; return the history and the held-out metrics before and after."""
    subject = _as_subject(subject_or_model)
    cfg = config or TrainingConfig()
    # Fail on a missing wandb before any training, not after.
    wandb = _import_wandb(wandb_project) if wandb_project else None
    lm = as_lm_data(data, subject, cfg)
    path = Path(csv_path) if csv_path is not None else None
    every = max(1, cfg.steps // 10)

    with seeded(cfg.seed) as seeds, _CsvLog(path) as log:
        model = training_copy(subject)
        initial = evaluate(subject, model, lm, cfg)
        run = (
            wandb.init(
                project=wandb_project, name=subject.name, config=cfg.to_dict(), job_type="finetune"
            )
            if wandb is not None
            else None
        )

        def on_step(metrics: StepMetrics) -> None:
            log.write(metrics)
            if run is not None:
                run.log(
                    {k: v for k, v in metrics.to_dict().items() if k != "step"}, step=metrics.step
                )
            if progress is not None and (metrics.step % every == 0 or metrics.step == 1):
                progress(f"step {metrics.step}/{cfg.steps}: loss {metrics.loss:.4g}")

        try:
            history = train_steps(subject, model, lm, cfg, on_step=on_step)
            final = evaluate(subject, model, lm, cfg)
            if run is not None:
                run.summary.update({f"heldout_{k}": v for k, v in final.to_dict().items()})
        finally:
            if run is not None:
                run.finish()
        del model
    return FinetuneResult(cfg, history, initial, final, path, seeds, lm.source)


# -- overfitting one batch ---------------------------------------------------------------------

OVERFIT_CONFIG = TrainingConfig(lr=3e-3, steps=200, batch_size=4, seq_len=16, grad_clip=1.0)


@dataclass(frozen=True)
class OverfitResult:
    initial_loss: float
    final_loss: float
    loss_drop: float  # 1 - final / initial
    target_drop: float
    steps: int
    reproduced_fraction: float  # of the compared tokens, argmax == target
    compared: str  # what was compared, in words
    losses: list[float] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return self.reproduced_fraction == 1.0

    @property
    def passed(self) -> bool:
        return self.loss_drop > self.target_drop and self.reproduced


def overfit_batch(subject: Subject, config: TrainingConfig) -> tuple[Tensor, Tensor]:
    """The fixed batch: random ids whose first tokens differ (rows sharing a prefix would
    ask for two different next tokens) and the tokens to predict."""
    low, high = token_range(subject)
    length = subject.longest(config.seq_len)
    generator = torch.Generator().manual_seed(config.seed)
    if high - low < config.batch_size:
        raise ValueError(f"A batch of {config.batch_size} needs {config.batch_size} free ids.")
    ids = torch.randint(low, high, (config.batch_size, length), generator=generator)
    ids[:, 0] = low + torch.randperm(high - low, generator=generator)[: config.batch_size]
    return ids, _lm_scored(subject, ids.shape, config, generator)


def compared_tokens(subject: Subject) -> str:
    if subject.kind == "decoder":
        return (
            "teacher-forced argmax at every position t equals the batch's token t+1 (so greedy "
            "decoding from each row's first token regenerates the row exactly)"
        )
    return (
        "argmax at the masked positions (the fixed mask of the batch) equals the original "
        "tokens" + (" (decoder teacher-forced)" if subject.kind == "encoder-decoder" else "")
    )


def overfit_one_batch(
    subject_or_model: Subject | nn.Module,
    config: TrainingConfig | None = None,
    *,
    target_drop: float = 0.9,
    progress: ProgressFn | None = None,
) -> OverfitResult:
    """Train a copy on one fixed batch for up to ``config.steps`` steps, stopping once the
    loss has fallen more than ``target_drop`` from its first value and every compared
    token is right; then, on the trained copy, compare its argmax predictions with the
    batch (``compared_tokens`` says what is compared).

    Trains in eval mode: with dropout off the loss measures what the model can memorise,
    not a dropout sample."""
    subject = _as_subject(subject_or_model)
    cfg = config or OVERFIT_CONFIG
    ids, scored = overfit_batch(subject, cfg)
    data = LMData(ids, ids, scored, scored, source="one batch")
    losses: list[float] = []

    def on_step(metrics: StepMetrics) -> bool:
        losses.append(metrics.loss)
        if progress is not None and metrics.step % 25 == 0:
            progress(f"step {metrics.step}/{cfg.steps}: loss {metrics.loss:.4g}")
        done = metrics.loss < (1 - target_drop) * losses[0] and metrics.token_accuracy == 1.0
        return done

    with seeded(cfg.seed):
        model = training_copy(subject)
        history = train_steps(
            subject, model, data, cfg, on_step=on_step, train_mode=False, whole_batch=True
        )
        with torch.no_grad():
            logits, targets, valid = lm_forward(subject, model, ids, scored)
            final_loss, correct, count = _loss(logits, targets, valid)
        del model
    initial = history[0].loss
    final = float(final_loss)
    if not (math.isfinite(initial) and math.isfinite(final)):
        drop = -math.inf  # a NaN or infinite loss never counts as a fall
    else:
        drop = 1.0 - final / initial if initial > 1e-12 else 1.0
    return OverfitResult(
        initial,
        final,
        drop,
        target_drop,
        len(history),
        correct / max(1, count),
        compared_tokens(subject),
        losses,
    )


# -- Optuna ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    params: dict[str, float]
    value: float | None  # held-out loss after training (inf: diverged)
    last_step: int | None  # the last step it reported
    intermediate: dict[int, float]  # training loss by step, as reported to the pruner

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SearchResult:
    best_params: dict[str, float] | None  # None: no trial completed
    best_value: float | None
    trials: list[TrialRecord]
    pruner: str

    @property
    def pruned(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "PRUNED"]


def optuna_search(
    subject_or_model: Subject | nn.Module,
    data: DataLike = None,
    config: TrainingConfig | None = None,
    *,
    n_trials: int = 4,
    lr_range: tuple[float, float] = (1e-4, 3e-2),
    weight_decay_range: tuple[float, float] | None = (0.0, 0.1),
    pruner: Any = None,
    enqueue: Sequence[Mapping[str, float]] = (),
    cleanup: Callable[[], Any] = free_memory,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """An Optuna study (TPE sampler seeded with ``config.seed``) over the learning rate
    (log scale) and the weight decay, minimising the held-out loss after ``config.steps``
    steps of ``finetune``'s training. Every trial reports its training loss each step, so
    the pruner (default: ``MedianPruner(n_startup_trials=2, n_warmup_steps=steps // 5)``)
    can stop it early; ``enqueue`` names trials to run first. After every trial its model
    and optimiser are dropped and ``cleanup`` (``free_memory``: ``gc.collect()``, and
    ``torch.cuda.empty_cache()`` under CUDA) runs."""
    try:
        import optuna
    except ImportError:
        raise OptunaUnavailableError(
            "The hyperparameter search needs the optuna package: pip install optuna."
        ) from None
    subject = _as_subject(subject_or_model)
    base = config or TrainingConfig()
    lm = as_lm_data(data, subject, base)
    chosen_pruner = pruner or optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=max(1, base.steps // 5)
    )

    def objective(trial: Any) -> float:
        changes: dict[str, Any] = {"lr": trial.suggest_float("lr", *lr_range, log=True)}
        if weight_decay_range is not None:
            changes["weight_decay"] = trial.suggest_float("weight_decay", *weight_decay_range)
        cfg = base.replace(**changes)
        pruned_at: list[int] = []

        def on_step(metrics: StepMetrics) -> bool:
            trial.report(metrics.loss, metrics.step)
            if trial.should_prune():
                pruned_at.append(metrics.step)
                return True
            return False

        with seeded(cfg.seed):
            model = training_copy(subject)
            history = train_steps(subject, model, lm, cfg, on_step=on_step)
            diverged = not math.isfinite(history[-1].loss)
            final = None if pruned_at or diverged else evaluate(subject, model, lm, cfg)
            # No frame or traceback may keep the copy alive once the trial is over.
            del model
        if pruned_at:
            raise optuna.TrialPruned(f"pruned at step {pruned_at[0]}")
        return math.inf if final is None or not math.isfinite(final.loss) else final.loss

    def after_trial(study: Any, trial: Any) -> None:
        cleanup()
        if progress is not None:
            progress(
                f"trial {trial.number + 1}/{n_trials}: lr {trial.params.get('lr', 0):.3g}, "
                f"{trial.state.name.lower()}"
            )

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=base.seed),
            pruner=chosen_pruner,
        )
        for params in enqueue:
            study.enqueue_trial(dict(params))
        study.optimize(objective, n_trials=n_trials, callbacks=[after_trial], catch=(Exception,))
    finally:
        optuna.logging.set_verbosity(verbosity)
    records = [
        TrialRecord(
            t.number,
            t.state.name,
            {k: float(v) for k, v in t.params.items()},
            None if t.value is None else float(t.value),
            t.last_step,
            {int(k): float(v) for k, v in t.intermediate_values.items()},
        )
        for t in study.trials
    ]
    complete = [r for r in records if r.state == "COMPLETE" and r.value is not None]
    best = min(complete, key=lambda r: r.value or math.inf) if complete else None
    return SearchResult(
        best.params if best is not None else None,
        best.value if best is not None else None,
        records,
        type(chosen_pruner).__name__,
    )


# -- benchmark tasks ---------------------------------------------------------------------------

TASK_VERSION = 1
BENCHMARK_CONFIG = TrainingConfig(lr=3e-3, steps=200, batch_size=32, seq_len=32)


@dataclass(frozen=True)
class BenchmarkTask:
    """A task shipped in ``tzoo/data/benchmarks``: (prompt, answer) strings over
    ``symbols`` (symbol i is token ``low + i``), or, with ``source == "shipped_corpus"``,
    next-byte prediction on the shipped texts."""

    name: str
    description: str
    symbols: str = ""
    train: tuple[tuple[str, str], ...] = ()
    test: tuple[tuple[str, str], ...] = ()
    source: str = ""
    seq_len: int = 32
    heldout_fraction: float = 0.25
    default: bool = True  # run when no tasks are named (False: only when asked for)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchmarkTask:
        if data.get("version") != TASK_VERSION:
            raise ValueError(f"A benchmark task of version {data.get('version')!r}.")
        task = cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            symbols=str(data.get("symbols", "")),
            train=tuple((str(p), str(a)) for p, a in data.get("train", ())),
            test=tuple((str(p), str(a)) for p, a in data.get("test", ())),
            source=str(data.get("source", "")),
            seq_len=int(data.get("seq_len", 32)),
            heldout_fraction=float(data.get("heldout_fraction", 0.25)),
            default=bool(data.get("default", True)),
        )
        if not task.source:
            if not task.train or not task.test:
                raise ValueError(f"Task {task.name} needs train and test examples.")
            examples = task.train + task.test
            lengths = {(len(p), len(a)) for p, a in examples}
            unknown = {c for p, a in examples for c in p + a} - set(task.symbols)
            if len(lengths) != 1 or unknown:
                raise ValueError(
                    f"Task {task.name}: every example needs one prompt and answer length and "
                    f"only the task's symbols (unknown: {''.join(sorted(unknown))!r})."
                )
        return task

    def data(self, subject: Subject) -> LMData:
        """The task as token ids for ``subject`` (ValueError: its vocabulary is too small
        or its longest input too short)."""
        if self.source == "shipped_corpus":
            return corpus_data(subject, self.seq_len, heldout_fraction=self.heldout_fraction)
        if self.source:
            raise ValueError(f"Task {self.name}: unknown source {self.source!r}.")
        low, high = token_range(subject)
        if high - low < len(self.symbols):
            raise ValueError(f"needs {len(self.symbols)} token ids; the model has {high - low}")
        length = len(self.train[0][0]) + len(self.train[0][1])
        if subject.max_length is not None and length > subject.max_length:
            raise ValueError(f"needs inputs of {length}; the model takes {subject.max_length}")
        index = {s: i for i, s in enumerate(self.symbols)}

        def encode(examples: tuple[tuple[str, str], ...]) -> tuple[Tensor, Tensor]:
            ids = torch.tensor([[low + index[c] for c in p + a] for p, a in examples])
            scored = torch.zeros(ids.shape, dtype=torch.bool)
            scored[:, len(examples[0][0]) :] = True  # the answer
            return ids, scored

        train, train_scored = encode(self.train)
        test, test_scored = encode(self.test)
        return LMData(train, test, train_scored, test_scored, source=f"task {self.name}")


def load_task(path: str | Path) -> BenchmarkTask:
    return BenchmarkTask.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def benchmark_tasks() -> list[BenchmarkTask]:
    """The tasks shipped in ``tzoo/data/benchmarks``, by file name."""
    folder = resources.files("tzoo").joinpath("data", "benchmarks")
    entries = sorted(
        (e for e in folder.iterdir() if e.name.endswith(".json")), key=lambda e: e.name
    )
    return [BenchmarkTask.from_dict(json.loads(e.read_text(encoding="utf-8"))) for e in entries]


@dataclass(frozen=True)
class BenchmarkResult:
    task: str
    accuracy: float | None  # token accuracy on the test rows' scored tokens
    exact_match: float | None  # test rows with every scored token right
    chance: float | None  # accuracy of the best input-blind guess (see ``chance_accuracy``)
    margin: float | None  # above chance means accuracy > chance + margin
    tokens: int
    steps: int
    skipped: str | None = None  # why the task did not run

    @property
    def above_chance(self) -> bool:
        return (
            self.accuracy is not None
            and self.chance is not None
            and self.margin is not None
            and self.accuracy > self.chance + self.margin
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "above_chance": self.above_chance}


def _targets(subject: Subject, ids: Tensor, scored: Tensor | None) -> tuple[Tensor, Tensor]:
    if scored is None:  # language-model data: any position may be scored
        scored = torch.ones(ids.shape, dtype=torch.bool)
    if subject.kind == "decoder":
        return ids[:, 1:], scored[:, 1:]
    return ids, scored


def chance_accuracy(subject: Subject, data: LMData) -> tuple[float, int]:
    """(accuracy, tokens) of the best guess that ignores the input: at each position the
    token most frequent there among the training targets, scored on the held-out ones."""
    train, train_valid = _targets(subject, data.train, data.train_scored)
    test, test_valid = _targets(subject, data.heldout, data.heldout_scored)
    overall = torch.mode(train[train_valid]).values
    correct, count = 0, 0
    for position in range(test.shape[1]):
        column = train[:, position][train_valid[:, position]]
        guess = torch.mode(column).values if len(column) else overall
        chosen = test[:, position][test_valid[:, position]]
        correct += int((chosen == guess).sum())
        count += len(chosen)
    return correct / max(1, count), count


@torch.no_grad()
def _exact_match(subject: Subject, model: nn.Module, data: LMData, config: TrainingConfig) -> float:
    if data.heldout_scored is None:
        return math.nan  # no answers to match: a running text
    rows = 0
    for start in range(0, len(data.heldout), config.batch_size):
        ids = data.heldout[start : start + config.batch_size]
        scored = data.heldout_scored[start : start + config.batch_size]
        logits, targets, valid = lm_forward(subject, model, ids, scored)
        right = (logits.argmax(-1) == targets) | ~valid
        rows += int(right.all(dim=1).sum())
    return rows / len(data.heldout)


def run_benchmarks(
    subject_or_model: Subject | nn.Module,
    *,
    tasks: Sequence[BenchmarkTask | str] | None = None,
    config: TrainingConfig | None = None,
    progress: ProgressFn | None = None,
) -> list[BenchmarkResult]:
    """Train a fresh copy of the model briefly on each task (``tasks``: names or tasks;
    default the shipped tasks marked ``default``) with ``config`` (default
    ``BENCHMARK_CONFIG``), and measure its accuracy on the task's test rows against the
    chance baseline; a task the model cannot take (vocabulary, length) is skipped."""
    subject = _as_subject(subject_or_model)
    cfg = config or BENCHMARK_CONFIG
    shipped = {task.name: task for task in benchmark_tasks()}
    chosen: list[BenchmarkTask] = []
    wanted = tasks if tasks is not None else [t for t in shipped.values() if t.default]
    for task in wanted:
        if isinstance(task, str) and task not in shipped:
            raise ValueError(f"No benchmark task {task!r}; the tasks are {', '.join(shipped)}.")
        chosen.append(shipped[task] if isinstance(task, str) else task)
    results: list[BenchmarkResult] = []
    for number, task in enumerate(chosen, 1):
        try:
            data = task.data(subject)
        except ValueError as why:
            results.append(BenchmarkResult(task.name, None, None, None, None, 0, 0, str(why)))
            continue
        if progress is not None:
            progress(f"task {number}/{len(chosen)}: {task.name}")
        # Evaluate every test row: the chance baseline is computed on all of them.
        task_cfg = cfg.replace(eval_batches=max(1, math.ceil(len(data.heldout) / cfg.batch_size)))
        with seeded(task_cfg.seed):
            model = training_copy(subject)
            history = train_steps(subject, model, data, task_cfg)
            metrics = evaluate(subject, model, data, task_cfg)
            exact = _exact_match(subject, model, data, task_cfg)
            del model
        chance, tokens = chance_accuracy(subject, data)
        margin = max(0.01, 2 * math.sqrt(chance * (1 - chance) / max(1, tokens)))
        results.append(
            BenchmarkResult(
                task.name,
                metrics.accuracy,
                None if math.isnan(exact) else exact,
                chance,
                margin,
                metrics.tokens,
                len(history),
            )
        )
    return results
