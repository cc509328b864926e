"""Interventions on transcoder features: set or scale a feature at (layer, position) and see
how the logits change.

Three ways to run the changed model, from the most to the least constrained:

- ``"direct"``: the linear local replacement model. Attention patterns, norm denominators
  and every other feature's activation stay as on the clean run; only the changed
  feature's decoder vector moves. The change of every downstream pre-activation and of every
  demeaned logit is then exactly what the attribution graph's edges out of that feature
  predict: ``(new - old activation) * edge weight``.
- ``"frozen"``: attention patterns and norm denominators as on the clean run; each layer's
  features are recomputed by the transcoders from what the layer now reads (so the change
  spreads through the features, nonlinearly), errors kept constant. A layer without a
  transcoder keeps its clean MLP output.
- ``"live"``: the real model's own forward pass with the transcoders in place of the MLPs
  (plus their constant error terms); attention and norms are recomputed. Layers without a
  transcoder run their real MLP.

With no intervention, each mode reproduces the real model's logits on the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tzoo.circuits.replacement import (
    ReplacementModel,
    ReplacementPass,
    build_replacement,
    resolve_position,
)
from tzoo.circuits.transcoders import TranscoderSet
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import PatchFn, patch

InterventionMode = Literal["direct", "frozen", "live"]
MODES: tuple[InterventionMode, ...] = ("direct", "frozen", "live")


class InterventionError(ValueError):
    """An intervention that does not fit the replacement model (layer, position, feature)."""


@dataclass(frozen=True)
class FeatureIntervention:
    """Set feature ``feature`` of ``layer`` at ``position`` to ``value``, or multiply its
    activation by ``factor`` (exactly one of the two)."""

    layer: int
    position: int
    feature: int
    value: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.factor is None):
            raise InterventionError("Give an intervention either a value or a factor.")

    @classmethod
    def set(cls, layer: int, position: int, feature: int, value: float) -> FeatureIntervention:
        return cls(layer, position, feature, value=value)

    @classmethod
    def scale(cls, layer: int, position: int, feature: int, factor: float) -> FeatureIntervention:
        return cls(layer, position, feature, factor=factor)

    def apply(self, activations: Tensor) -> None:
        """Change ``activations`` (..., T, F) in place."""
        at = (..., self.position, self.feature)
        if self.value is not None:
            activations[at] = self.value
        else:
            activations[at] = activations[at] * float(self.factor or 0.0)


@dataclass(frozen=True)
class TokenProbability:
    token_id: int
    token: str
    probability: float
    logit: float


@dataclass(eq=False)
class InterventionResult:
    """Logits and features before and after, at every position; top tokens at ``position``."""

    mode: InterventionMode
    position: int
    interventions: list[FeatureIntervention]
    logits_before: Tensor  # (T, V)
    logits_after: Tensor  # (T, V)
    pre_activations_before: dict[int, Tensor]  # layer -> (T, F)
    pre_activations_after: dict[int, Tensor]  # layer -> (T, F)
    activations_after: dict[int, Tensor]  # layer -> (T, F), interventions applied
    top_before: list[TokenProbability]
    top_after: list[TokenProbability]


def check_interventions(
    replacement: ReplacementModel, interventions: Sequence[FeatureIntervention]
) -> list[FeatureIntervention]:
    """The interventions with positions made non-negative, or InterventionError."""
    checked = []
    n_features = replacement.transcoders.config.n_features
    for item in interventions:
        if item.layer not in replacement.layers:
            raise InterventionError(
                f"No transcoder at layer {item.layer}; they cover {list(replacement.layers)}."
            )
        if not 0 <= item.feature < n_features:
            raise InterventionError(f"Feature {item.feature} is not in 0..{n_features - 1}.")
        try:
            position = resolve_position(item.position, replacement.n_tokens)
        except ValueError as error:
            raise InterventionError(str(error)) from None
        checked.append(
            FeatureIntervention(item.layer, position, item.feature, item.value, item.factor)
        )
    return checked


@torch.no_grad()
def intervene(
    replacement: ReplacementModel,
    interventions: Sequence[FeatureIntervention],
    *,
    mode: InterventionMode = "frozen",
    position: int = -1,
    top_k: int = 10,
) -> InterventionResult:
    """Run ``replacement``'s prompt with ``interventions`` applied, in ``mode`` (see the
    module docstring); top tokens are read at ``position``."""
    if mode not in MODES:
        raise InterventionError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    rm = replacement
    changes = check_interventions(rm, interventions)
    where = resolve_position(position, rm.n_tokens)
    by_layer: dict[int, list[FeatureIntervention]] = {}
    for change in changes:
        by_layer.setdefault(change.layer, []).append(change)

    if mode == "live":
        before, pre_before = rm.logits, rm.pre_activations
        acts, pre_after, after = _live_pass(rm, by_layer)
    else:
        # Before and after both from the replacement model's own passes, so that their
        # difference is the intervention's effect alone (no float noise from the real run).
        clean = rm.forward()
        before, pre_before = rm.unembed(clean.final), _pre_activations(rm, clean)
        if mode == "direct":
            acts = {layer: a.clone() for layer, a in rm.activations.items()}
            for change in changes:
                change.apply(acts[change.layer])
            changed = rm.forward(None, rm.constants(acts))
            after, pre_after = rm.unembed(changed.final), _pre_activations(rm, changed)
        else:
            acts, pre_after, final = _frozen_pass(rm, by_layer)
            after = rm.unembed(final)
    return InterventionResult(
        mode=mode,
        position=where,
        interventions=changes,
        logits_before=before,
        logits_after=after,
        pre_activations_before=pre_before,
        pre_activations_after=pre_after,
        activations_after=acts,
        top_before=_top(rm, before[where], top_k),
        top_after=_top(rm, after[where], top_k),
    )


def steer(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    prompt: str | Sequence[int],
    interventions: Sequence[FeatureIntervention],
    *,
    mode: InterventionMode = "frozen",
    position: int = -1,
    top_k: int = 10,
) -> InterventionResult:
    """``intervene`` on a replacement model built for ``prompt``."""
    replacement = build_replacement(handle, transcoders, prompt)
    return intervene(replacement, interventions, mode=mode, position=position, top_k=top_k)


def _pre_activations(rm: ReplacementModel, run: ReplacementPass) -> dict[int, Tensor]:
    return {layer: rm.encode(layer, run.mlp_inputs[layer]) for layer in rm.layers}


def _recompute(
    rm: ReplacementModel,
    layer: int,
    x: Tensor,
    acts: dict[int, Tensor],
    pre: dict[int, Tensor],
    changes: list[FeatureIntervention],
) -> Tensor:
    """The transcoder's MLP output at ``layer`` for input ``x``, features recomputed and
    changed, plus the layer's constant error; records activations and pre-activations."""
    pre[layer] = rm.encode(layer, x)
    acts[layer] = rm.activate(layer, pre[layer])
    for change in changes:
        change.apply(acts[layer])
    out = rm.decode(layer, acts) + rm.errors[layer]
    skip = rm.skip(layer, x)
    return out if skip is None else out + skip


def _frozen_pass(
    rm: ReplacementModel, by_layer: dict[int, list[FeatureIntervention]]
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    acts: dict[int, Tensor] = {}
    pre: dict[int, Tensor] = {}

    def mlp(layer: int, x: Tensor) -> Tensor:
        if layer not in rm.folded:
            return rm.mlp_out[layer]
        return _recompute(rm, layer, x, acts, pre, by_layer.get(layer, []))

    run = rm.run(rm.embeddings, mlp)
    return acts, pre, run.final


def _live_pass(
    rm: ReplacementModel, by_layer: dict[int, list[FeatureIntervention]]
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    handle = rm.handle
    inputs: dict[int, Tensor] = {}
    acts: dict[int, Tensor] = {}
    pre: dict[int, Tensor] = {}

    def read(layer: int) -> Callable[[Tensor], None]:
        def record(x: Tensor) -> None:
            inputs[layer] = x[0].float()

        return record

    def write(layer: int) -> Callable[[Tensor], Tensor]:
        def replace(y: Tensor) -> Tensor:
            x = inputs[layer]
            out = _recompute(rm, layer, x, acts, pre, by_layer.get(layer, []))
            return out[None].to(y.dtype)

        return replace

    config = rm.transcoders.config
    fns: dict[str, PatchFn] = {config.hook_in(layer): read(layer) for layer in rm.layers}
    fns |= {config.hook_out(layer): write(layer) for layer in rm.layers}
    with handle.lock, patch(handle, fns):
        logits = handle.model(input_ids=rm.input_ids[None], use_cache=False).logits[0]
    return acts, pre, logits.float()


def _top(rm: ReplacementModel, logits: Tensor, k: int) -> list[TokenProbability]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(k, probs.numel()))
    tokenizer = rm.handle.tokenizer
    return [
        TokenProbability(int(i), tokenizer.decode([int(i)]), float(p), float(logits[i]))
        for p, i in zip(values, ids, strict=True)
    ]
