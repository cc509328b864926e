"""The tuned lens (Belrose et al., 2023): one learned affine translator per layer, so that
``unembed(final_norm(h + A_l h + b_l))`` matches the model's final distribution better than
the logit lens ``unembed(final_norm(h))`` does.

Each translator starts at zero (A = 0, b = 0), where the tuned lens *is* the logit lens,
and is trained to lower KL(final || lens) on text; the model itself stays frozen. Layer L,
the model's output, has no translator.

Training (``train_tuned_lens``): the corpus is tokenized into one stream (documents joined
by the end-of-sequence token) and cut into windows of ``seq_len`` tokens. Each step takes
``batch_size`` windows, runs the model once under no_grad to get the residual stream, then
sums KL(final || lens at layer l) over layers 0..L-1, averaged over positions, and takes
one Adam step on the translators alone. The learning rate warms up linearly over the first
tenth of the steps and then decays linearly to zero. The window order is fixed by the seed,
so a run resumed from a checkpoint takes the same steps as one never interrupted.

On disk (``TunedLens.save``): ``lens.safetensors`` (``translators.{l}.weight|bias``) and
``config.json`` (format, version, model name, d_model, n_layers, training statistics).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from tzoo.analyses.lens import Readout, kl_to_final, residual_stack
from tzoo.config import Settings, get_settings
from tzoo.runtime.handle import ModelHandle

Tensor = torch.Tensor
ProgressFn = Callable[[int, int, float], None]  # (steps done, total steps, loss)

FORMAT = "tzoo-tuned-lens"
FORMAT_VERSION = 1
WEIGHTS_FILE = "lens.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"


class LensMismatchError(ValueError):
    """A tuned lens (or checkpoint) trained for another model, width or depth."""


class LensNotFoundError(FileNotFoundError):
    """No tuned lens where one was looked for."""


class TunedLens(nn.Module):
    """One translator ``h -> h + A h + b`` per layer 0..L-1; layer L is the identity.

    ``training`` holds what the lens was trained with and how well it did (saved with it).
    """

    def __init__(
        self,
        model_name: str,
        d_model: int,
        n_layers: int,
        training: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.d_model = d_model
        self.n_layers = n_layers
        self.training_stats: dict[str, Any] = dict(training or {})
        translators = [nn.Linear(d_model, d_model) for _ in range(n_layers)]
        for translator in translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)
        self.translators = nn.ModuleList(translators)

    @classmethod
    def for_model(cls, handle: ModelHandle) -> TunedLens:
        """A zero-initialised lens (equal to the logit lens) for ``handle``'s decoder."""
        readout = Readout.of(handle)
        return cls(handle.name, readout.d_model, readout.n_layers)

    def forward(self, h: Tensor, layer: int) -> Tensor:
        """``h`` (..., d) at ``layer`` (0..L) translated, in ``h``'s dtype and device."""
        if layer == self.n_layers:
            return h
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"No layer {layer}: this lens has layers 0..{self.n_layers}.")
        translator: nn.Linear = self.translators[layer]  # type: ignore[assignment]
        x = h.to(translator.weight)
        return (x + translator(x)).to(h)

    def check_compatible(self, handle: ModelHandle) -> None:
        """Raise LensMismatchError unless this lens was made for ``handle``'s model."""
        readout = Readout.of(handle)
        mine = (self.model_name, self.d_model, self.n_layers)
        theirs = (handle.name, readout.d_model, readout.n_layers)
        if mine != theirs:
            raise LensMismatchError(
                f"This tuned lens was trained for {self.model_name} (d_model {self.d_model}, "
                f"{self.n_layers} layers), not {handle.name} (d_model {readout.d_model}, "
                f"{readout.n_layers} layers); train one with "
                f"`tzoo lens train --model {handle.name}`."
            )

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_name": self.model_name,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "training": self.training_stats,
        }

    def save(self, directory: Path | str) -> Path:
        """Write the lens into ``directory`` (created if needed); return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> TunedLens:
        """The lens saved in ``directory``; LensNotFoundError when there is none."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise LensNotFoundError(
                f"No tuned lens in {directory} (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                "train one with `tzoo lens train --model NAME`."
            )
        lens = cls.from_config(_read_config(directory / CONFIG_FILE))
        weights = load_file(str(directory / WEIGHTS_FILE))
        _load_state(lens, weights, str(directory))
        return lens

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TunedLens:
        return cls(
            str(config["model_name"]),
            int(config["d_model"]),
            int(config["n_layers"]),
            config.get("training") or {},
        )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable tuned-lens config: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tuned-lens config (no format {FORMAT!r}).")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has tuned-lens format version {config.get('version')!r}; this version "
            f"of tzoo reads version {FORMAT_VERSION}. Train the lens again."
        )
    missing = [key for key in ("model_name", "d_model", "n_layers") if key not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}.")
    return config


def _load_state(lens: TunedLens, weights: dict[str, Tensor], where: str) -> None:
    expected = {name: tuple(t.shape) for name, t in lens.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected != found:
        wrong = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise LensMismatchError(
            f"The weights in {where} do not fit a lens of d_model {lens.d_model} and "
            f"{lens.n_layers} layers (first differences: {wrong})."
        )
    lens.load_state_dict(weights)


def safe_name(model_name: str) -> str:
    """A file name for a model name (hub ids and paths contain slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"


def default_lens_dir(model_name: str, settings: Settings | None = None) -> Path:
    """Where ``tzoo lens train`` saves the lens of ``model_name``: TZOO_TUNED_LENS_DIR, by
    default ``TZOO_CACHE_DIR/lenses``, then the model's name."""
    settings = settings or get_settings()
    root = settings.tuned_lens_dir or settings.cache_dir / "lenses"
    return root / safe_name(model_name)


# -- data -----------------------------------------------------------------------------------


def token_windows(tokenizer: Any, docs: Sequence[str], seq_len: int) -> Tensor:
    """(n, seq_len) token ids: ``docs`` tokenized, joined by the end-of-sequence token and
    cut into whole windows; one shorter window when the corpus is shorter than seq_len."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2; got {seq_len}.")
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream += [int(i) for i in tokenizer(doc)["input_ids"]]
        if separator is not None:
            stream.append(int(separator))
    if len(stream) < 2:
        raise ValueError("The corpus has no text to train or evaluate a lens on.")
    length = min(seq_len, len(stream))
    n = len(stream) // length
    return torch.tensor(stream[: n * length]).view(n, length)


def window_order(seed: int, n_windows: int) -> Callable[[int, int], list[int]]:
    """``batch(step, size)``: the windows of a training step. Each pass over the windows is
    a fresh permutation drawn from (seed, epoch), so any step's batch is known without
    replaying the run (what makes a resumed run take the very same steps)."""
    if n_windows < 1:
        raise ValueError("There are no token windows to train on.")
    epochs: dict[int, list[int]] = {}

    def permutation(epoch: int) -> list[int]:
        if epoch not in epochs:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            epochs[epoch] = torch.randperm(n_windows, generator=generator).tolist()
        return epochs[epoch]

    def batch(step: int, size: int) -> list[int]:
        first = step * size
        return [permutation(j // n_windows)[j % n_windows] for j in range(first, first + size)]

    return batch


# -- training -------------------------------------------------------------------------------


def _frozen_readout(readout: Readout, dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    """``h -> float32 logits`` through the final norm and unembedding with their parameters
    detached, so gradients reach the lens but the (shared) model's weights never collect
    any; under autocast to ``dtype`` when one is given."""

    def frozen(module: nn.Module | None) -> Callable[[Tensor], Tensor]:
        if module is None:
            return lambda x: x
        params = {name: p.detach() for name, p in module.named_parameters()}
        return lambda x: functional_call(module, params, (x,))

    norm, unembed = frozen(readout.norm), frozen(readout.unembed)

    def logits(h: Tensor) -> Tensor:
        with torch.autocast(h.device.type, dtype=dtype or h.dtype, enabled=dtype is not None):
            return unembed(norm(h)).float()

    return logits


def _learning_rate(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first tenth of the steps, then linear decay to zero."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def train_tuned_lens(
    handle: ModelHandle,
    corpus_train: Sequence[str],
    *,
    steps: int = 300,
    lr: float = 5e-4,
    seq_len: int = 128,
    batch_size: int = 2,
    seed: int = 0,
    readout_dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
) -> TunedLens:
    """Train a tuned lens for ``handle`` on ``corpus_train`` (see the module docstring).

    The caller holds the model (its hooks are installed for each step's forward pass).
    ``readout_dtype=torch.bfloat16`` runs the final norm and unembedding of the lens (most
    of the work: a (positions, d) x (d, vocab) product per layer) under bfloat16 autocast,
    about twice as fast on CPUs with bfloat16 units; evaluation is not affected.
    With ``checkpoint_dir``, the lens and optimizer state are written there every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from that checkpoint
    (when there is one) up to ``steps``. ``progress(step, steps, loss)`` is called after
    each step with the loss, KL in nats averaged over layers 0..L-1 and positions.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1 or not lr > 0:
        raise ValueError("steps, batch_size and checkpoint_every must be >= 1, lr > 0.")
    readout = Readout.of(handle)
    device = next(handle.model.parameters()).device
    lens = TunedLens.for_model(handle).to(device)
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    windows = token_windows(handle.tokenizer, corpus_train, seq_len)
    batch_of = window_order(seed, windows.shape[0])
    start, losses = 0, list[float]()  # steps done, the loss of each
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if resume and checkpoint is not None and checkpoint.is_file():
        start, losses = _load_checkpoint(checkpoint, lens, optimizer, handle)
    logits_of = _frozen_readout(readout, readout_dtype)
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr)
        ids = windows[batch_of(step, batch_size)].to(device)
        losses.append(_train_step(handle, lens, optimizer, ids, logits_of, readout.chunk_rows))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
        done = step + 1
        if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            _save_checkpoint(checkpoint, lens, optimizer, done, losses)
    lens.training_stats = {
        "steps": steps,
        "lr": lr,
        "seq_len": int(windows.shape[1]),
        "batch_size": batch_size,
        "seed": seed,
        "readout_dtype": str(readout_dtype or "model").removeprefix("torch."),
        "train_documents": len(corpus_train),
        "train_tokens": int(windows.numel()),
        "final_loss": losses[-1] if losses else None,
    }
    return lens.cpu().eval()


def _train_step(
    handle: ModelHandle,
    lens: TunedLens,
    optimizer: torch.optim.Optimizer,
    ids: Tensor,
    logits_of: Callable[[Tensor], Tensor],
    rows: int,
) -> float:
    """One optimizer step on one batch (B, T); the loss, mean KL over layers 0..L-1.
    Gradients are accumulated ``rows`` positions at a time, layer by layer, so only one
    (rows, V) graph is alive at once."""
    stack = residual_stack(handle, ids).flatten(1, 2)  # (L + 1, N = B*T, d), no grad
    n = stack.shape[1]
    spans = [(start, min(start + rows, n)) for start in range(0, n, rows)]
    with torch.no_grad():
        targets = [torch.log_softmax(logits_of(stack[-1, s:e]), dim=-1) for s, e in spans]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for layer in range(lens.n_layers):
        for (start, end), log_p in zip(spans, targets, strict=True):
            translated = lens(stack[layer, start:end], layer)
            log_q = torch.log_softmax(logits_of(translated), dim=-1)  # (rows, V)
            kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
            (kl / n).backward()
            total += float(kl.detach()) / n
    optimizer.step()
    return total / lens.n_layers


def _save_checkpoint(
    path: Path, lens: TunedLens, optimizer: torch.optim.Optimizer, step: int, losses: list[float]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": lens.config(),
        "step": step,
        "losses": losses,
        "lens": lens.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint whole


def _load_checkpoint(
    path: Path, lens: TunedLens, optimizer: torch.optim.Optimizer, handle: ModelHandle
) -> tuple[int, list[float]]:
    """Restore the lens and optimizer; return (steps done, losses so far)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"Cannot read the checkpoint {path}: {exc}") from None
    TunedLens.from_config(state["config"]).check_compatible(handle)
    _load_state(lens, state["lens"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), [float(x) for x in state["losses"]]


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate_kl(
    handle: ModelHandle,
    lens: TunedLens | None,
    corpus: Sequence[str],
    *,
    seq_len: int = 128,
    batch_size: int = 8,
) -> np.ndarray:
    """(L + 1,) mean KL(final || lens) in nats per layer over every position of ``corpus``:
    the logit lens for ``lens=None``, else the tuned lens. The last entry is 0."""
    readout = Readout.of(handle)
    if lens is not None:
        lens.check_compatible(handle)
    windows = token_windows(handle.tokenizer, corpus, seq_len)
    device = next(handle.model.parameters()).device
    totals = torch.zeros(readout.n_layers + 1, dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        stack = residual_stack(handle, windows[start : start + batch_size].to(device))
        kl = kl_to_final(readout, stack.flatten(1, 2), lens)  # (L + 1, B*T)
        totals += kl.double().sum(dim=1).cpu()
    return (totals / windows.numel()).numpy()


def kl_table(logit: np.ndarray, tuned: np.ndarray) -> list[dict[str, Any]]:
    """Rows ``{layer, logit_kl, tuned_kl, improved}`` for layers 0..L-1."""
    return [
        {
            "layer": layer,
            "logit_kl": float(logit[layer]),
            "tuned_kl": float(tuned[layer]),
            "improved": bool(tuned[layer] < logit[layer]),
        }
        for layer in range(len(logit) - 1)
    ]
