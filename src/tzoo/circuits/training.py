"""Training and evaluating transcoders (``tzoo.circuits.transcoders``) on a model's MLPs.

Loss, per step, over a batch of N tokens (``activations.collect_mlp_pairs``), in *scaled
units* (inputs and outputs multiplied by the set's fixed ``input_scale`` and
``output_scale``, so both have mean norm sqrt(d_model); measured once by ``set_scales``
from a first pass over ``norm_tokens`` tokens):

    mse      = sum_l mean_n || (y^_l - y_l) * output_scale_l ||^2
    sparsity = sum_l mean_n sum_i tanh(c * ||W_dec_i|| * a_i)          (Ameisen et al. 2025)
    pre_act  = sum_l mean_n sum_i relu(threshold_i - pre_i) * ||W_dec_i||  (JumpReLU only)
    loss     = mse + lambda_t * sparsity + pre_act_coefficient * pre_act

``||W_dec_i||`` is the norm of feature i's decoder in scaled units; a cross-layer feature's
is taken over every layer it writes to (``TranscoderSet.decoder_norms``). The pre-activation
penalty is the one of Anthropic's January 2025 circuits update: it pushes the pre-activations
of features that never fire up towards their threshold, the only gradient a dead JumpReLU
feature gets. TopK sets are trained on the MSE alone (k fixes the sparsity).

Schedules (``sparsity_lambda_at``, ``learning_rate_at``): lambda rises linearly from
``sparsity / steps`` at the first step to ``sparsity`` at the last; the Adam learning rate
is constant, then falls linearly towards 0 over the last 20% of the steps. JumpReLU
thresholds are clamped at 0 after every step (a negative threshold would let negative
pre-activations through).

Steps: each takes ``batch_tokens / seq_len`` windows in an order fixed by the seed
(``tuned_lens.window_order``), so a run resumed from its checkpoint (weights, Adam state,
dead-feature counters, history) takes exactly the steps of a run never interrupted.

Dead features (``DeadFeatureTracker``): a feature is dead when it has not fired on any of
the last ``dead_after_tokens`` training tokens.

``evaluate_transcoders`` measures, on held-out text, each layer's explained variance
(1 - MSE / variance of the true MLP output), L0 and the fraction of features that never
fired, and for the replacement model (every covered MLP output replaced at once by the
transcoders' prediction, read from the replacement model's own MLP inputs) the agreement of
its next-token argmax with the real model's and KL(real || replacement).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tzoo.analyses.tuned_lens import token_windows, window_order
from tzoo.circuits.activations import (
    SKIPPED_POSITIONS,
    MLPBatch,
    collect_mlp_pairs,
    mean_norms,
    stream_mlp_pairs,
)
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import PatchFn, patch, run_with_cache

Tensor = torch.Tensor
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "tzoo-transcoder-checkpoint"
CHECKPOINT_VERSION = 1
LR_DECAY_FRACTION = 0.2  # the learning rate decays linearly over the last 20% of the steps


class TrainingError(ValueError):
    """Training that cannot start or continue (bad options, a checkpoint that does not fit)."""


# -- schedules --------------------------------------------------------------------------------


def sparsity_lambda_at(step: int, steps: int, sparsity: float) -> float:
    """lambda at step ``step`` (0-based) of ``steps``: a linear ramp that reaches
    ``sparsity`` at the last step."""
    return sparsity * min(1.0, (step + 1) / steps)


def learning_rate_at(step: int, steps: int, lr: float) -> float:
    """``lr`` for the first 80% of the steps, then a linear decay towards 0 (the last step
    gets ``lr / decay_steps``)."""
    decay_steps = max(1, round(steps * LR_DECAY_FRACTION))
    decay_start = steps - decay_steps
    if step < decay_start:
        return lr
    return lr * (steps - step) / decay_steps


# -- dead features ----------------------------------------------------------------------------


class DeadFeatureTracker:
    """Per layer, the number of training tokens since each feature last fired."""

    def __init__(self, layers: Sequence[int], n_features: int, dead_after_tokens: int) -> None:
        if dead_after_tokens < 1:
            raise TrainingError("dead_after_tokens must be at least 1.")
        self.dead_after_tokens = dead_after_tokens
        self.since_fired = {layer: torch.zeros(n_features, dtype=torch.long) for layer in layers}

    def update(self, acts: dict[int, Tensor]) -> None:
        """Count a batch: ``acts`` (N, F) feature activations by layer."""
        for layer, a in acts.items():
            fired = (a > 0).any(dim=0).cpu()
            counter = self.since_fired[layer]
            counter += a.shape[0]
            counter[fired] = 0

    def dead(self, layer: int) -> Tensor:
        """(F,) bool: features silent for the last ``dead_after_tokens`` tokens."""
        return self.since_fired[layer] >= self.dead_after_tokens

    def dead_fraction(self, layer: int) -> float:
        return float(self.dead(layer).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {
            "dead_after_tokens": self.dead_after_tokens,
            "since_fired": {str(k): v.clone() for k, v in self.since_fired.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dead_after_tokens = int(state["dead_after_tokens"])
        self.since_fired = {int(k): v.clone() for k, v in state["since_fired"].items()}


# -- the loss ---------------------------------------------------------------------------------


@dataclass
class LossParts:
    """One batch's loss and its parts (the parts detached, as floats)."""

    total: Tensor
    mse: float
    sparsity: float
    pre_act: float
    l0: dict[int, float]  # mean active features per token, by layer
    acts: dict[int, Tensor]  # (N, F) activations by layer, detached


def transcoder_loss(
    transcoders: TranscoderSet,
    batch: MLPBatch,
    *,
    sparsity_lambda: float,
    c: float = 4.0,
    pre_act_coefficient: float = 0.0,
) -> LossParts:
    """The training loss of the module docstring on one batch."""
    config = transcoders.config
    pres = {layer: transcoders.encode(layer, batch.inputs[layer]) for layer in transcoders.layers}
    acts = {layer: transcoders.activate(layer, pre) for layer, pre in pres.items()}
    mse = torch.zeros((), device=batch.inputs[transcoders.layers[0]].device)
    sparsity = torch.zeros_like(mse)
    pre_act = torch.zeros_like(mse)
    for layer in transcoders.layers:
        i = transcoders.index(layer)
        predicted = transcoders.decode(layer, acts, batch.inputs[layer])  # (N, d), model units
        error = (predicted - batch.outputs[layer]) * transcoders.output_scale[i]
        mse = mse + error.pow(2).sum(dim=-1).mean()
        if config.activation == "jumprelu":
            norms = transcoders.decoder_norms(layer)  # (F,)
            sparsity = sparsity + torch.tanh(c * norms * acts[layer]).sum(dim=-1).mean()
            below = torch.relu(transcoders.threshold[i] - pres[layer])  # (N, F)
            pre_act = pre_act + (below * norms).sum(dim=-1).mean()
    total = mse
    if config.activation == "jumprelu":
        total = total + sparsity_lambda * sparsity + pre_act_coefficient * pre_act
    return LossParts(
        total=total,
        mse=float(mse.detach()),
        sparsity=float(sparsity.detach()),
        pre_act=float(pre_act.detach()),
        l0={layer: float((a > 0).float().sum(dim=-1).mean()) for layer, a in acts.items()},
        acts={layer: a.detach() for layer, a in acts.items()},
    )


# -- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """What the progress callback hears after each step."""

    step: int  # steps done
    steps: int
    loss: float
    mse: float  # summed over layers, scaled units
    sparsity: float  # the tanh penalty before lambda
    l0: dict[int, float]
    dead_fraction: dict[int, float]
    sparsity_lambda: float
    lr: float

    @property
    def mean_l0(self) -> float:
        return sum(self.l0.values()) / len(self.l0)

    @property
    def mean_dead_fraction(self) -> float:
        return sum(self.dead_fraction.values()) / len(self.dead_fraction)


ProgressFn = Callable[[StepStats], None]


@dataclass(frozen=True)
class _Plan:
    """The options that fix a run; a checkpoint resumes only under the same plan."""

    tokens: int
    batch_tokens: int
    seq_len: int
    lr: float
    sparsity: float
    c: float
    pre_act_coefficient: float
    dead_after_tokens: int
    norm_tokens: int
    seed: int
    corpus_tokens: int  # the corpus itself: a different text gives different windows


def train_transcoders(
    handle: ModelHandle,
    config: TranscoderConfig,
    texts: Sequence[str],
    *,
    tokens: int = 100_000,
    batch_tokens: int = 1024,
    seq_len: int = 128,
    lr: float = 2e-3,
    sparsity: float = 3.0,
    c: float = 4.0,
    pre_act_coefficient: float = 3e-6,
    dead_after_tokens: int = 50_000,
    norm_tokens: int = 16_384,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> TranscoderSet:
    """Train the transcoders ``config`` describes on ``handle``'s MLPs over ``texts`` (see
    the module docstring); return them on the CPU, in eval mode, with how they were trained
    in ``config.training``.

    ``tokens`` is the training length (whole steps of about ``batch_tokens`` tokens; the
    corpus is passed over as often as needed). ``sparsity`` is lambda's final value.
    With ``checkpoint_dir`` the state is saved there every ``checkpoint_every`` steps and at
    the end; ``resume`` continues from it (when there is one) and ends where an
    uninterrupted run would. The caller holds the model.
    """
    _check_options(handle, config, tokens, batch_tokens, lr, checkpoint_every)
    device = next(handle.model.parameters()).device
    windows = token_windows(handle.tokenizer, texts, seq_len)  # (n, T)
    length = int(windows.shape[1])
    if length <= SKIPPED_POSITIONS:
        raise TrainingError("The corpus is too short to train transcoders on.")
    windows_per_step = max(1, round(batch_tokens / length))
    tokens_per_step = windows_per_step * (length - SKIPPED_POSITIONS)
    steps = max(1, math.ceil(tokens / tokens_per_step))
    plan = _Plan(
        tokens=tokens,
        batch_tokens=batch_tokens,
        seq_len=seq_len,
        lr=lr,
        sparsity=sparsity,
        c=c,
        pre_act_coefficient=pre_act_coefficient,
        dead_after_tokens=dead_after_tokens,
        norm_tokens=norm_tokens,
        seed=seed,
        corpus_tokens=int(windows.numel()),
    )
    batch_of = window_order(seed, windows.shape[0])
    sites = (config.stack, config.input_site, config.output_site)

    transcoders = TranscoderSet(config, seed=seed).to(device)
    optimizer = torch.optim.Adam(transcoders.parameters(), lr=lr)
    tracker = DeadFeatureTracker(config.layers, config.n_features, dead_after_tokens)
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if resume and checkpoint is not None and checkpoint.is_file():
        start = _load_checkpoint(checkpoint, config, plan, transcoders, optimizer, tracker, history)
    else:
        n_norm = min(windows.shape[0], max(1, math.ceil(norm_tokens / (length - 1))))
        first = windows[batch_of(0, n_norm)]
        stream = stream_mlp_pairs(
            handle,
            first,
            config.layers,
            windows_per_batch=windows_per_step,
            stack=sites[0],
            input_site=sites[1],
            output_site=sites[2],
        )
        transcoders.set_scales(*mean_norms(stream))

    transcoders.train()
    for step in range(start, steps):
        rate = learning_rate_at(step, steps, lr)
        lam = sparsity_lambda_at(step, steps, sparsity)
        for group in optimizer.param_groups:
            group["lr"] = rate
        ids = windows[batch_of(step, windows_per_step)]
        batch = collect_mlp_pairs(
            handle, ids, config.layers, stack=sites[0], input_site=sites[1], output_site=sites[2]
        )
        parts = transcoder_loss(
            transcoders,
            batch,
            sparsity_lambda=lam,
            c=c,
            pre_act_coefficient=pre_act_coefficient,
        )
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        _clamp_thresholds(transcoders)
        tracker.update(parts.acts)
        stats = StepStats(
            step=step + 1,
            steps=steps,
            loss=float(parts.total.detach()),
            mse=parts.mse,
            sparsity=parts.sparsity,
            l0=parts.l0,
            dead_fraction={layer: tracker.dead_fraction(layer) for layer in config.layers},
            sparsity_lambda=lam,
            lr=rate,
        )
        history.append({"loss": stats.loss, "mse": stats.mse, "l0": stats.mean_l0})
        done = step + 1
        if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            _save_checkpoint(
                checkpoint, config, plan, done, transcoders, optimizer, tracker, history
            )
        if progress is not None:
            progress(stats)

    transcoders.config = dataclasses.replace(
        config, training=_provenance(plan, steps, tokens_per_step, len(texts), tracker, history)
    )
    return transcoders.cpu().eval()


def _check_options(
    handle: ModelHandle,
    config: TranscoderConfig,
    tokens: int,
    batch_tokens: int,
    lr: float,
    checkpoint_every: int,
) -> None:
    if tokens < 1 or batch_tokens < 1 or checkpoint_every < 1 or not lr > 0:
        raise TrainingError("tokens, batch_tokens and checkpoint_every must be >= 1, lr > 0.")
    if config.d_model != handle.d_model:
        raise TrainingError(
            f"The transcoders have d_model {config.d_model}; {handle.name} has {handle.d_model}."
        )
    if config.n_model_layers != handle.n_layers or config.layers[-1] >= handle.n_layers:
        raise TrainingError(
            f"{handle.name} has {handle.n_layers} layers (0..{handle.n_layers - 1}); the "
            f"transcoders are for layers {list(config.layers)} of {config.n_model_layers}."
        )


@torch.no_grad()
def _clamp_thresholds(transcoders: TranscoderSet) -> None:
    if transcoders.config.activation == "jumprelu":
        for threshold in transcoders.threshold:
            threshold.clamp_(min=0.0)


def _provenance(
    plan: _Plan,
    steps: int,
    tokens_per_step: int,
    n_texts: int,
    tracker: DeadFeatureTracker,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {
        **dataclasses.asdict(plan),
        "steps": steps,
        "tokens_seen": steps * tokens_per_step,
        "train_documents": n_texts,
        "final_loss": last.get("loss"),
        "final_mse": last.get("mse"),
        "final_l0": last.get("l0"),
        "dead_fraction": [tracker.dead_fraction(layer) for layer in tracker.since_fired],
    }


def _save_checkpoint(
    path: Path,
    config: TranscoderConfig,
    plan: _Plan,
    step: int,
    transcoders: TranscoderSet,
    optimizer: torch.optim.Optimizer,
    tracker: DeadFeatureTracker,
    history: list[dict[str, Any]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": _structure(config),
        "plan": dataclasses.asdict(plan),
        "step": step,
        "transcoders": transcoders.state_dict(),
        "optimizer": optimizer.state_dict(),
        "tracker": tracker.state_dict(),
        "history": history,
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint whole


def _load_checkpoint(
    path: Path,
    config: TranscoderConfig,
    plan: _Plan,
    transcoders: TranscoderSet,
    optimizer: torch.optim.Optimizer,
    tracker: DeadFeatureTracker,
    history: list[dict[str, Any]],
) -> int:
    """Restore everything from ``path``; return the steps already done."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"Cannot read the checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a transcoder training checkpoint.")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(
            f"{path} is a checkpoint of version {state.get('version')!r}; this tzoo resumes "
            f"version {CHECKPOINT_VERSION}. Train again without --resume."
        )
    differences = _differences(state["config"], _structure(config))
    differences += _differences(state["plan"], dataclasses.asdict(plan))
    if differences:
        raise TrainingError(
            f"The checkpoint {path} was made with other settings ({'; '.join(differences)}); "
            "resume with the same ones, or train afresh without --resume."
        )
    transcoders.load_state_dict(state["transcoders"])
    optimizer.load_state_dict(state["optimizer"])
    tracker.load_state_dict(state["tracker"])
    history[:] = state["history"]
    return int(state["step"])


def _structure(config: TranscoderConfig) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("training", None)
    return data


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [
        f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now"
        for key in keys
        if saved.get(key) != wanted.get(key)
    ]


# -- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerEvaluation:
    layer: int
    explained_variance: float  # 1 - MSE / variance of the true MLP output
    mse: float  # mean squared error per token, summed over d_model, model units
    l0: float  # mean active features per token
    dead_fraction: float  # features that never fired on the evaluation text


@dataclass(frozen=True)
class TranscoderEvaluation:
    layers: list[LayerEvaluation]
    # The replacement model's argmax == the real model's (a masked-LM's prediction at each
    # position for an encoder); None with KL for a model without a head (no logits).
    next_token_agreement: float | None
    kl: float | None  # mean KL(real || replacement) in nats per position
    n_tokens: int  # positions evaluated (position 0 of each window left out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate_transcoders(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    texts: Sequence[str],
    *,
    seq_len: int = 128,
    windows_per_batch: int = 4,
) -> TranscoderEvaluation:
    """Reconstruction per layer and the replacement model's next-token fidelity on
    ``texts`` (see the module docstring). Position 0 of every window is left out of every
    number, and the replacement keeps the real MLP output there (as in training). The
    transcoders are moved to the model's device; the caller holds the model."""
    config = transcoders.config
    if config.d_model != handle.d_model or config.layers[-1] >= handle.n_layers:
        raise TrainingError(
            f"These transcoders (d_model {config.d_model}, layers {list(config.layers)}) do "
            f"not fit {handle.name} (d_model {handle.d_model}, {handle.n_layers} layers)."
        )
    device = next(handle.model.parameters()).device
    transcoders.to(device).eval()
    windows = token_windows(handle.tokenizer, texts, seq_len)
    if windows.shape[1] <= SKIPPED_POSITIONS:
        raise TrainingError("The evaluation text is too short.")
    totals = _Totals(config.layers, config.n_features)
    for start in range(0, windows.shape[0], windows_per_batch):
        ids = windows[start : start + windows_per_batch].to(device)
        outputs, cache = run_with_cache(
            handle,
            {"input_ids": ids},
            sites=[config.input_site, config.output_site],
            stacks=config.stack,
            layers=list(config.layers),
            attentions=False,
        )
        skip = SKIPPED_POSITIONS
        batch = MLPBatch(
            inputs={i: _flat(cache[config.hook_in(i)], skip) for i in config.layers},
            outputs={i: _flat(cache[config.hook_out(i)], skip) for i in config.layers},
        )
        totals.add_reconstruction(transcoders, batch)
        real = getattr(outputs, "logits", None)
        if real is None:  # a bare encoder: nothing to compare
            continue
        with patch(handle, _replacement_fns(transcoders)):
            replaced = handle.model(input_ids=ids, use_cache=False).logits
        totals.add_logits(real[:, skip:].float(), replaced[:, skip:].float())
    return totals.result()


def _flat(value: Tensor, skip: int) -> Tensor:
    return value[:, skip:].reshape(-1, value.shape[-1]).float()  # (B * (T - skip), d)


def _replacement_fns(transcoders: TranscoderSet) -> dict[str, PatchFn]:
    """Patches that replace every covered MLP output by the transcoders' prediction from
    the MLP inputs of the same (replaced) forward pass; position 0 stays real."""
    config = transcoders.config
    inputs: dict[int, Tensor] = {}
    acts: dict[int, Tensor] = {}
    fns: dict[str, PatchFn] = {}
    for layer in config.layers:

        def read(x: Tensor, layer: int = layer) -> None:
            inputs[layer] = x.float()
            acts[layer] = transcoders.activate(layer, transcoders.encode(layer, inputs[layer]))

        def write(y: Tensor, layer: int = layer) -> Tensor:
            predicted = transcoders.decode(layer, acts, inputs[layer]).to(y.dtype)  # (B, T, d)
            predicted[:, :SKIPPED_POSITIONS] = y[:, :SKIPPED_POSITIONS]
            return predicted

        fns[config.hook_in(layer)] = read
        fns[config.hook_out(layer)] = write
    return fns


class _Totals:
    """Running sums for ``evaluate_transcoders`` (float64, on the CPU)."""

    def __init__(self, layers: Sequence[int], n_features: int) -> None:
        self.layers = list(layers)
        self.n = 0
        self.sse = dict.fromkeys(layers, 0.0)
        self.sum_y: dict[int, Tensor] = {}
        self.sum_y2 = dict.fromkeys(layers, 0.0)
        self.active = dict.fromkeys(layers, 0.0)
        self.fired = {layer: torch.zeros(n_features, dtype=torch.bool) for layer in layers}
        self.positions = 0
        self.agree = 0
        self.kl = 0.0

    def add_reconstruction(self, transcoders: TranscoderSet, batch: MLPBatch) -> None:
        predicted, acts = transcoders(batch.inputs)
        self.n += batch.n_tokens
        for layer in self.layers:
            y = batch.outputs[layer].double()
            self.sse[layer] += float((predicted[layer].double() - y).pow(2).sum())
            self.sum_y[layer] = self.sum_y.get(layer, 0) + y.sum(dim=0).cpu()
            self.sum_y2[layer] += float(y.pow(2).sum())
            a = acts[layer]
            self.active[layer] += float((a > 0).sum())
            self.fired[layer] |= (a > 0).any(dim=0).cpu()

    def add_logits(self, real: Tensor, replaced: Tensor) -> None:
        """``real``, ``replaced``: (B, T', V) logits."""
        self.positions += real.shape[0] * real.shape[1]
        self.agree += int((real.argmax(-1) == replaced.argmax(-1)).sum())
        log_p = torch.log_softmax(real, dim=-1)
        log_q = torch.log_softmax(replaced, dim=-1)
        self.kl += float((log_p.exp() * (log_p - log_q)).sum())

    def result(self) -> TranscoderEvaluation:
        rows = []
        for layer in self.layers:
            # total variance about the mean, summed over d_model
            variance = self.sum_y2[layer] - float(self.sum_y[layer].pow(2).sum()) / self.n
            rows.append(
                LayerEvaluation(
                    layer=layer,
                    explained_variance=1.0 - self.sse[layer] / max(variance, 1e-12),
                    mse=self.sse[layer] / self.n,
                    l0=self.active[layer] / self.n,
                    dead_fraction=float((~self.fired[layer]).float().mean()),
                )
            )
        return TranscoderEvaluation(
            layers=rows,
            next_token_agreement=self.agree / self.positions if self.positions else None,
            kl=self.kl / self.positions if self.positions else None,
            n_tokens=self.n,
        )
