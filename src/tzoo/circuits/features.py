"""Transcoder features on text: the active features of a prompt and Neuronpedia-style
feature dashboards built from a corpus.

**Active features** (``active_features``): one forward pass, every transcoder layer's
activations ``act(x_l @ W_enc + b_enc)`` at every position, the ``k`` largest across layers
per position (raw activations: no weighting by decoder norm).

**Dashboards** (``build_dashboards``) stream over the corpus in batches of about
``batch_tokens`` tokens (texts sorted by length, right-padded, each truncated to
``max_tokens``); only per-feature summaries are kept, never the activations of the corpus:

- pass 1: count of active tokens, sum and max of activations, an exact histogram, the top
  activating contexts (at most one per text: the text's maximum), and, on request, a
  uniform sample of non-activating contexts (windows where the feature is silent);
- pass 2 (when ``quantiles`` and ``samples_per_quantile`` are positive): the active tokens
  are cut into ``quantiles`` bins of about equal count, with edges read from pass 1's
  histogram, and ``samples_per_quantile`` tokens are drawn uniformly from each bin.

Random samples are "largest random key" samples (each active token draws a key from a
seeded generator; a reservoir keeps the largest keys), which is a uniform sample without
replacement and merges batch by batch on tensors. The histogram starts, per feature, with
``_FINE_BINS`` bins up to the first batch's max and doubles its bin width (merging bin
pairs, exactly) whenever a larger activation arrives, so its counts are exact and its top
bin holds the max; the dashboard shows it merged down to ``histogram_bins`` bins, with the
empty bins above the max trimmed. A token is *active* when its activation is > 0.

Special tokens (BOS and the like) and padding are left out everywhere: they count as no
token, their activations read 0, and they are dropped from the context windows (so a
context lists only real tokens; ``index`` marks the token it is about).

State grows with the features asked for (top and sampled windows, the histogram), and each
batch needs a ``(batch_tokens, features)`` workspace per layer; when that exceeds
``memory_mb``, features are split into groups with one corpus pass (two with quantiles)
each. A pass runs the model only up to the deepest layer its group needs.

**Top and bottom logits** are the feature's decoder direction read through the final norm
and the unembedding, as Neuronpedia does for transcoders and SAEs (TransformerLens folds
the final norm's weight into ``W_U``): ``logits = (w_dec * gamma) @ W_U.T`` (a LayerNorm
also centres ``w_dec`` first). The norm's division by the residual's RMS (or std) is left
out: it is a positive per-token scalar, so it does not change which tokens rank first; the
values are logit effects per unit of normalised residual. Biases are left out too (they do
not depend on the feature). A cross-layer transcoder's feature writes to every later layer;
its logits use the decoder into the last layer it writes (the one nearest the output).
Encoder-only models have no unembedding: their dashboards have no logits.

Floats in results are rounded to ``DIGITS`` significant digits when the result is built,
so ``from_dict(to_dict(x)) == x`` and the JSON stays small.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from tzoo.analyses.attention import EmptyInputError, InputTooLongError, display_tokens
from tzoo.circuits.transcoders import TranscoderMismatchError, TranscoderSet
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import adapter_for, patch

DASHBOARD_VERSION = 1
DIGITS = 4  # significant digits kept for floats in results
_FINE_BINS = 256  # the histogram's internal resolution; a power of two (bins merge in pairs)
DEFAULT_MAX_TOKENS = 1024  # active_features: longest prompt accepted

ProgressFn = Callable[[int, int], None]  # (batches done, total batches over all passes)
FeatureKey = tuple[int, int]  # (layer, feature)


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveFeature:
    layer: int
    feature: int
    activation: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "feature": self.feature, "activation": self.activation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActiveFeature:
        return cls(int(data["layer"]), int(data["feature"]), float(data["activation"]))


@dataclass(frozen=True)
class ActiveFeatures:
    """The strongest features at each position of a prompt (``positions[t]``, strongest
    first; fewer than ``k`` where fewer are active, none at special tokens)."""

    model_name: str
    text: str
    tokens: list[str]
    token_ids: list[int]
    positions: list[list[ActiveFeature]]
    k: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": DASHBOARD_VERSION,
            "model_name": self.model_name,
            "text": self.text,
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "k": self.k,
            "positions": [[f.to_dict() for f in row] for row in self.positions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActiveFeatures:
        _check_version(data)
        return cls(
            model_name=str(data["model_name"]),
            text=str(data["text"]),
            tokens=[str(t) for t in data["tokens"]],
            token_ids=[int(i) for i in data["token_ids"]],
            positions=[[ActiveFeature.from_dict(f) for f in row] for row in data["positions"]],
            k=int(data["k"]),
        )


@dataclass(frozen=True)
class FeatureContext:
    """A window of a corpus text around one token: ``tokens[index]`` is the token at
    ``position`` of text ``document``; ``activations`` is the feature's activation at each
    token of the window (special tokens dropped)."""

    document: int
    position: int
    index: int
    tokens: list[str]
    token_ids: list[int]
    activations: list[float]

    @property
    def activation(self) -> float:
        """The activation at the token the context is about."""
        return self.activations[self.index]

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    def text(self) -> str:
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "document": self.document,
            "position": self.position,
            "index": self.index,
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "activations": list(self.activations),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureContext:
        return cls(
            document=int(data["document"]),
            position=int(data["position"]),
            index=int(data["index"]),
            tokens=[str(t) for t in data["tokens"]],
            token_ids=[int(i) for i in data["token_ids"]],
            activations=[float(a) for a in data["activations"]],
        )


@dataclass(frozen=True)
class QuantileBin:
    """Active tokens with ``low < activation <= high`` (``n_active`` of them in the corpus)
    and contexts drawn uniformly from them, strongest first."""

    low: float
    high: float
    n_active: int
    contexts: list[FeatureContext]

    def to_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "n_active": self.n_active,
            "contexts": [c.to_dict() for c in self.contexts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantileBin:
        return cls(
            low=float(data["low"]),
            high=float(data["high"]),
            n_active=int(data["n_active"]),
            contexts=[FeatureContext.from_dict(c) for c in data["contexts"]],
        )


@dataclass(frozen=True)
class TokenLogit:
    token: str
    token_id: int
    logit: float

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "token_id": self.token_id, "logit": self.logit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLogit:
        return cls(str(data["token"]), int(data["token_id"]), float(data["logit"]))


@dataclass(frozen=True)
class Histogram:
    """Counts of active tokens by activation: bin i holds ``edges[i] <= a < edges[i + 1]``;
    the counts add up to the feature's ``n_active``. Empty for a feature never active."""

    edges: list[float]
    counts: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        return cls([float(e) for e in data["edges"]], [int(c) for c in data["counts"]])


@dataclass(frozen=True)
class FeatureDashboard:
    """What one feature does on a corpus (see the module docstring for how each part is
    computed). ``logits_layer``: the layer whose decoder the logits read (a CLT's last;
    None when the model has no unembedding)."""

    model_name: str
    layer: int
    feature: int
    n_tokens: int  # tokens seen (special tokens and padding excluded)
    n_active: int  # tokens where the activation is > 0
    frequency: float  # n_active / n_tokens
    max_activation: float
    mean_activation: float  # over the active tokens
    top_contexts: list[FeatureContext]
    quantiles: list[QuantileBin]
    top_logits: list[TokenLogit]
    bottom_logits: list[TokenLogit]
    histogram: Histogram
    logits_layer: int | None
    inactive_contexts: list[FeatureContext] = field(default_factory=list)

    @property
    def key(self) -> FeatureKey:
        return (self.layer, self.feature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": DASHBOARD_VERSION,
            "model_name": self.model_name,
            "layer": self.layer,
            "feature": self.feature,
            "n_tokens": self.n_tokens,
            "n_active": self.n_active,
            "frequency": self.frequency,
            "max_activation": self.max_activation,
            "mean_activation": self.mean_activation,
            "top_contexts": [c.to_dict() for c in self.top_contexts],
            "quantiles": [q.to_dict() for q in self.quantiles],
            "top_logits": [t.to_dict() for t in self.top_logits],
            "bottom_logits": [t.to_dict() for t in self.bottom_logits],
            "histogram": self.histogram.to_dict(),
            "logits_layer": self.logits_layer,
            "inactive_contexts": [c.to_dict() for c in self.inactive_contexts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureDashboard:
        _check_version(data)
        logits_layer = data.get("logits_layer")
        return cls(
            model_name=str(data["model_name"]),
            layer=int(data["layer"]),
            feature=int(data["feature"]),
            n_tokens=int(data["n_tokens"]),
            n_active=int(data["n_active"]),
            frequency=float(data["frequency"]),
            max_activation=float(data["max_activation"]),
            mean_activation=float(data["mean_activation"]),
            top_contexts=[FeatureContext.from_dict(c) for c in data["top_contexts"]],
            quantiles=[QuantileBin.from_dict(q) for q in data["quantiles"]],
            top_logits=[TokenLogit.from_dict(t) for t in data["top_logits"]],
            bottom_logits=[TokenLogit.from_dict(t) for t in data["bottom_logits"]],
            histogram=Histogram.from_dict(data["histogram"]),
            logits_layer=None if logits_layer is None else int(logits_layer),
            inactive_contexts=[
                FeatureContext.from_dict(c) for c in data.get("inactive_contexts", [])
            ],
        )


def _check_version(data: Mapping[str, Any]) -> None:
    version = data.get("version")
    if version != DASHBOARD_VERSION:
        raise ValueError(
            f"Unsupported feature result version {version!r}; this tzoo reads version "
            f"{DASHBOARD_VERSION}."
        )


# -- active features ------------------------------------------------------------------------


def active_features(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    text: str,
    *,
    k: int = 10,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> ActiveFeatures:
    """The ``k`` strongest active features at each position of ``text``, across the
    transcoder layers (``layers``: a subset; default all), strongest first. One forward
    pass, run only as deep as the last layer needed; takes the handle's lock meanwhile.
    Text longer than ``max_tokens`` (default 1024) raises InputTooLongError."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    if not text or not text.strip():
        raise EmptyInputError("The text is empty; give the model something to read.")
    _check_fits(handle, transcoders)
    chosen = _chosen_layers(transcoders, layers)
    ids = [int(i) for i in handle.tokenizer(text)["input_ids"]]
    limit = max_tokens or DEFAULT_MAX_TOKENS
    if len(ids) > limit:
        raise InputTooLongError(len(ids), limit, "max_tokens")
    input_ids = torch.tensor([ids])
    valid = _valid_mask(handle, input_ids, torch.ones_like(input_ids))[0]  # (T,)
    inputs = _mlp_inputs(handle, transcoders, chosen, input_ids, torch.ones_like(input_ids))
    device = _device_of(transcoders)
    n_features = transcoders.config.n_features
    with torch.no_grad():
        acts = torch.cat(
            [_activations(transcoders, layer, inputs[layer])[0] for layer in chosen], dim=-1
        )  # (T, len(chosen) * F)
    acts = acts * valid.to(device).unsqueeze(-1)
    values, indices = acts.topk(min(k, acts.shape[-1]), dim=-1)  # (T, k)
    positions = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
        positions.append(
            [
                ActiveFeature(chosen[i // n_features], i % n_features, _round1(v))
                for v, i in zip(row_values, row_indices, strict=True)
                if v > 0
            ]
        )
    return ActiveFeatures(
        model_name=handle.name,
        text=text,
        tokens=display_tokens(handle.tokenizer, ids),
        token_ids=ids,
        positions=positions,
        k=k,
    )


# -- dashboards -----------------------------------------------------------------------------


_PARAMETERS = {  # _Options field -> build_dashboards parameter
    "top": "contexts_per_feature",
    "per_quantile": "samples_per_quantile",
    "inactive": "inactive_contexts",
    "radius": "window",
}


@dataclass(frozen=True)
class _Options:
    top: int
    quantiles: int
    per_quantile: int
    inactive: int
    radius: int
    histogram_bins: int
    n_logits: int

    @classmethod
    def checked(cls, **values: int) -> _Options:
        for name, value in values.items():
            if value < 0:
                public = _PARAMETERS.get(name, name)
                raise ValueError(f"{public} must not be negative; got {value}.")
        bins = values["histogram_bins"]
        if bins < 1 or _FINE_BINS % bins:
            raise ValueError(f"histogram_bins must divide {_FINE_BINS}; got {bins}.")
        return cls(**values)

    @property
    def width(self) -> int:
        return 2 * self.radius + 1

    @property
    def second_pass(self) -> bool:
        return self.quantiles > 0 and self.per_quantile > 0

    def state_bytes(self, batch_tokens: int) -> int:
        """Bytes per feature: reservoirs (score, document, position, window activations
        and ids), the histogram, and the per-batch workspace."""
        slots = self.top + self.quantiles * self.per_quantile + self.inactive
        return slots * (20 + 8 * self.width) + 8 * _FINE_BINS + 24 * batch_tokens


def build_dashboards(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    features: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    contexts_per_feature: int = 20,
    quantiles: int = 5,
    samples_per_quantile: int = 5,
    inactive_contexts: int = 0,
    window: int = 16,
    n_logits: int = 10,
    histogram_bins: int = 32,
    max_tokens: int = 256,
    batch_tokens: int = 4096,
    memory_mb: float = 1024,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[FeatureKey, FeatureDashboard]:
    """Dashboards of the chosen features over ``texts`` (see the module docstring).

    ``layers``: transcoder layers (default all); ``features``: feature indices for every
    chosen layer, or a mapping layer -> indices (default all). ``contexts_per_feature``
    top contexts; ``quantiles`` bins of ``samples_per_quantile`` contexts each;
    ``inactive_contexts``: that many windows where the feature is silent throughout (for
    detection scoring); ``window`` tokens on each side of a context's token.
    ``histogram_bins`` must divide 256. ``progress(done, total)`` after every batch of every
    pass. The handle's lock is held during each forward pass."""
    _check_fits(handle, transcoders)
    options = _Options.checked(
        top=contexts_per_feature,
        quantiles=quantiles,
        per_quantile=samples_per_quantile,
        inactive=inactive_contexts,
        radius=window,
        histogram_bins=histogram_bins,
        n_logits=n_logits,
    )
    if max_tokens < 1 or batch_tokens < 1 or memory_mb <= 0:
        raise ValueError("max_tokens and batch_tokens must be at least 1, memory_mb positive.")
    selection = _selection(transcoders, layers, features)
    encoded = [[int(i) for i in handle.tokenizer(t)["input_ids"]][:max_tokens] for t in texts]
    special = set(handle.tokenizer.all_special_ids)
    if not any(i not in special for ids in encoded for i in ids):
        raise EmptyInputError("The texts give no tokens; dashboards need a corpus.")
    batches = _plan_batches([len(ids) for ids in encoded], batch_tokens)
    capacity = max(1, int(memory_mb * 2**20) // options.state_bytes(batch_tokens))
    groups = _feature_groups(selection, capacity)
    passes = 2 if options.second_pass else 1
    ticks = _Ticks(len(groups) * passes * len(batches), progress)
    generator = torch.Generator(device=_device_of(transcoders)).manual_seed(seed)
    table = _TokenTable(handle)
    dashboards: dict[FeatureKey, FeatureDashboard] = {}
    for group in groups:
        device = _device_of(transcoders)
        states = {layer: _LayerState(feats, options, device) for layer, feats in group.items()}
        for second in range(passes):
            if second:
                for state in states.values():
                    state.start_quantiles()
            for batch in batches:
                chunk = _Batch.of(handle, encoded, batch)
                inputs = _mlp_inputs(handle, transcoders, list(states), chunk.input_ids, chunk.mask)
                with torch.no_grad():
                    for layer, state in states.items():
                        acts = _activations(transcoders, layer, inputs[layer], state.features)
                        acts = acts * chunk.valid.to(acts.device).unsqueeze(-1)  # (B, T, F)
                        if second:
                            state.sample_quantiles(acts, chunk, generator)
                        else:
                            state.observe(acts, chunk, generator)
                ticks.tick()
        for layer, state in states.items():
            logits, logits_layer = _logit_tables(
                handle, transcoders, layer, state.features, n_logits, table
            )
            for dashboard in state.dashboards(handle.name, layer, logits, logits_layer, table):
                dashboards[dashboard.key] = dashboard
    return dashboards


class _Ticks:
    """Calls ``progress(done, total)`` once per batch of every pass."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def detection_contexts(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    texts: Sequence[str],
    layer: int,
    feature: int,
    *,
    n_activating: int = 10,
    n_non_activating: int = 10,
    quantiles: int = 5,
    window: int = 16,
    max_tokens: int = 256,
    seed: int = 0,
) -> list[FeatureContext]:
    """Contexts of held-out ``texts`` to score a label of (layer, feature) by detection:
    up to ``n_activating`` windows around active tokens (drawn across ``quantiles``
    activation bins, so weak activations are represented too) and up to
    ``n_non_activating`` windows where the feature is silent throughout."""
    per_bin = max(1, math.ceil(n_activating / max(1, quantiles)))
    dashboard = build_dashboards(
        handle,
        transcoders,
        texts,
        features={layer: [feature]},
        contexts_per_feature=0,
        quantiles=quantiles,
        samples_per_quantile=per_bin,
        inactive_contexts=n_non_activating,
        window=window,
        n_logits=0,
        max_tokens=max_tokens,
        seed=seed,
    )[(layer, feature)]
    # Take bins in turn so every activation level is represented when trimming.
    activating: list[FeatureContext] = []
    rounds = [list(q.contexts) for q in dashboard.quantiles]
    while len(activating) < n_activating and any(rounds):
        for contexts in rounds:
            if contexts and len(activating) < n_activating:
                activating.append(contexts.pop(0))
    return activating + list(dashboard.inactive_contexts)


# -- corpus batches -------------------------------------------------------------------------


def _plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Text indices per batch: longest first, as many texts as fit ``batch_tokens`` once
    padded (at least one). Empty texts are skipped."""
    order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class _Batch:
    documents: Tensor  # (B,) text indices
    input_ids: Tensor  # (B, T) right-padded
    mask: Tensor  # (B, T) 1 on real tokens
    valid: Tensor  # (B, T) bool: real and not special
    ids: Tensor  # (B, T) token ids, -1 where not valid

    @classmethod
    def of(cls, handle: ModelHandle, encoded: list[list[int]], batch: list[int]) -> _Batch:
        width = max(len(encoded[i]) for i in batch)
        pad = handle.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad if pad is not None else 0)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        valid = _valid_mask(handle, input_ids, mask)
        ids = torch.where(valid, input_ids, -1).to(torch.int32)
        return cls(torch.tensor(batch), input_ids, mask, valid, ids)


def _valid_mask(handle: ModelHandle, input_ids: Tensor, mask: Tensor) -> Tensor:
    special = torch.tensor(sorted(set(handle.tokenizer.all_special_ids)), dtype=torch.long)
    return mask.bool() & ~torch.isin(input_ids, special)


# -- model and transcoders ------------------------------------------------------------------


class _Enough(Exception):
    """Raised by the last hook a pass needs, to skip the rest of the model."""


def _mlp_inputs(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    layers: Sequence[int],
    input_ids: Tensor,
    mask: Tensor,
) -> dict[int, Tensor]:
    """The MLP inputs (B, T, d) of ``layers``, from a forward pass stopped after the
    deepest of them is read."""
    model = handle.model
    config = transcoders.config
    store: dict[int, Tensor] = {}
    last = max(layers)

    def recorder(layer: int) -> Callable[[Tensor], None]:
        def record(value: Tensor) -> None:
            store[layer] = value.detach().clone()
            if layer == last:
                raise _Enough

        return record

    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    hooks = {config.hook_in(layer): recorder(layer) for layer in layers}
    with handle.lock, torch.no_grad(), patch(handle, hooks), contextlib.suppress(_Enough):
        model(**kwargs)
    missing = [layer for layer in layers if layer not in store]
    if missing:
        raise TranscoderMismatchError(f"The forward pass never reached layers {missing}.")
    return store


def _activations(
    transcoders: TranscoderSet, layer: int, x: Tensor, features: Tensor | None = None
) -> Tensor:
    """(..., F) feature activations for MLP inputs ``x`` (all features: TopK needs them to
    decide), then the columns ``features``."""
    device = _device_of(transcoders)
    dtype = transcoders.W_enc[0].dtype
    acts = transcoders.activate(layer, transcoders.encode(layer, x.to(device, dtype)))
    return acts if features is None else acts[..., features]


def _device_of(transcoders: TranscoderSet) -> torch.device:
    return next(transcoders.parameters()).device


def _check_fits(handle: ModelHandle, transcoders: TranscoderSet) -> None:
    config = transcoders.config
    if handle.architecture == "encoder-decoder":
        raise TranscoderMismatchError(
            f"Features need a decoder-only or encoder-only model; {handle.name} is an "
            "encoder-decoder model."
        )
    if config.d_model != handle.d_model:
        raise TranscoderMismatchError(
            f"These transcoders read width {config.d_model}; {handle.name} has d_model "
            f"{handle.d_model}."
        )
    stacks = adapter_for(handle.model).stack_names(handle.model)
    if config.stack not in stacks:
        raise TranscoderMismatchError(
            f"These transcoders read stack {config.stack!r}; {handle.name} has {', '.join(stacks)}."
        )
    depth = len(adapter_for(handle.model).blocks(handle.model, config.stack))
    if config.n_model_layers != depth:
        raise TranscoderMismatchError(
            f"These transcoders were made for {config.n_model_layers} layers; {handle.name} "
            f"has {depth}."
        )


def _chosen_layers(transcoders: TranscoderSet, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(transcoders.layers)
    for layer in layers:
        transcoders.index(layer)  # KeyError naming the layers it has
    return sorted(set(layers))


def _selection(
    transcoders: TranscoderSet,
    layers: Sequence[int] | None,
    features: Sequence[int] | Mapping[int, Sequence[int]] | None,
) -> dict[int, Tensor]:
    """Layer -> sorted feature indices."""
    n_features = transcoders.config.n_features
    if isinstance(features, Mapping):
        wanted = {layer: list(feats) for layer, feats in features.items()}
        if layers is not None:
            wanted = {layer: feats for layer, feats in wanted.items() if layer in layers}
    else:
        every = list(range(n_features)) if features is None else list(features)
        wanted = {layer: every for layer in _chosen_layers(transcoders, layers)}
    selection = {}
    for layer in sorted(wanted):
        transcoders.index(layer)
        feats = sorted(set(int(f) for f in wanted[layer]))
        bad = [f for f in feats if not 0 <= f < n_features]
        if bad:
            raise ValueError(f"Features {bad[:5]} do not exist; layers have {n_features}.")
        if feats:
            selection[layer] = torch.tensor(feats, dtype=torch.long)
    if not selection:
        raise ValueError("No features chosen.")
    return selection


def _feature_groups(selection: dict[int, Tensor], capacity: int) -> list[dict[int, Tensor]]:
    """Split the selection into groups of at most ``capacity`` features (one pass each)."""
    groups: list[dict[int, Tensor]] = []
    current: dict[int, Tensor] = {}
    room = capacity
    for layer, feats in selection.items():
        start = 0
        while start < len(feats):
            take = min(room, len(feats) - start)
            current[layer] = feats[start : start + take]
            start += take
            room -= take
            if room == 0:
                groups.append(current)
                current, room = {}, capacity
    if current:
        groups.append(current)
    return groups


# -- per-layer statistics -------------------------------------------------------------------


class _Reservoir:
    """Per feature, the ``size`` entries with the largest score seen so far, with their
    context windows. Scores are activations (top contexts) or random keys (samples)."""

    def __init__(self, size: int, n_features: int, width: int, device: torch.device) -> None:
        self.size = size
        self.score = torch.full((size, n_features), -math.inf, device=device)
        self.document = torch.zeros((size, n_features), dtype=torch.long, device=device)
        self.position = torch.zeros((size, n_features), dtype=torch.long, device=device)
        self.acts = torch.zeros((size, n_features, width), device=device)
        self.ids = torch.full((size, n_features, width), -1, dtype=torch.int32, device=device)

    def offer_positions(self, score: Tensor, acts: Tensor, batch: _Batch, radius: int) -> None:
        """Candidates at every (flattened) position: ``score`` (B * T, F), -inf for none."""
        if not self.size:
            return
        k = min(self.size, score.shape[0])
        best, flat = score.topk(k, dim=0)  # (k, F)
        width = acts.shape[1]
        self.offer(best, flat // width, flat % width, acts, batch, radius)

    def offer(
        self,
        score: Tensor,
        rows: Tensor,
        positions: Tensor,
        acts: Tensor,
        batch: _Batch,
        radius: int,
    ) -> None:
        """Candidates (K, F): score, batch row and position of each; ``acts`` (B, T, F)."""
        if not self.size:
            return
        windows, ids = _windows(acts, batch.ids.to(acts.device), rows, positions, radius)
        documents = batch.documents.to(acts.device)[rows]
        score = torch.cat([self.score, score])
        keep = score.topk(self.size, dim=0).indices  # (size, F)
        self.score = score.gather(0, keep)
        self.document = torch.cat([self.document, documents]).gather(0, keep)
        self.position = torch.cat([self.position, positions]).gather(0, keep)
        wide = keep.unsqueeze(-1).expand(-1, -1, self.acts.shape[-1])
        self.acts = torch.cat([self.acts, windows]).gather(0, wide)
        self.ids = torch.cat([self.ids, ids]).gather(0, wide)

    def contexts(self, column: int, table: _TokenTable) -> list[FeatureContext]:
        """The kept entries of one feature, highest score first."""
        found = []
        scores = self.score[:, column].tolist()
        order = sorted(range(self.size), key=lambda i: -scores[i])
        for i in order:
            if scores[i] == -math.inf:
                continue
            found.append(
                _context(
                    int(self.document[i, column]),
                    int(self.position[i, column]),
                    self.acts[i, column],
                    self.ids[i, column],
                    table,
                )
            )
        return found


def _windows(
    acts: Tensor, ids: Tensor, rows: Tensor, positions: Tensor, radius: int
) -> tuple[Tensor, Tensor]:
    """Windows around (rows, positions) (K, F) of column f for each feature f: activations
    (K, F, W) and token ids (K, F, W), -1 outside the text."""
    length = acts.shape[1]
    offsets = torch.arange(-radius, radius + 1, device=acts.device)
    where = positions.unsqueeze(-1) + offsets  # (K, F, W)
    inside = (where >= 0) & (where < length)
    where = where.clamp(0, length - 1)
    row = rows.unsqueeze(-1).expand_as(where)
    column = torch.arange(acts.shape[2], device=acts.device).view(1, -1, 1).expand_as(where)
    windows = acts[row, where, column] * inside
    window_ids = torch.where(inside, ids[row, where], -1)
    return windows, window_ids.to(torch.int32)


class _Histogram:
    """Exact per-feature histograms of positive values with doubling bin widths."""

    def __init__(self, n_features: int, device: torch.device) -> None:
        self.width = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.counts = torch.zeros((n_features, _FINE_BINS), dtype=torch.long, device=device)

    def add(self, values: Tensor) -> None:
        """``values`` (N, F); only positive ones count."""
        if not values.numel():
            return
        self._fit(values.max(dim=0).values.double())
        positive = values > 0
        width = torch.where(self.width > 0, self.width, 1.0)
        bins = (values.double() / width).floor().long().clamp(0, _FINE_BINS - 1)
        n_features = values.shape[1]
        flat = torch.arange(n_features, device=values.device) * _FINE_BINS + bins
        counted = torch.bincount(flat[positive], minlength=n_features * _FINE_BINS)
        self.counts += counted.view(n_features, _FINE_BINS)

    def _fit(self, batch_max: Tensor) -> None:
        fresh = (self.width == 0) & (batch_max > 0)
        # The first max lands in the top bin: floor(m / (m * (1 + 1e-9) / B)) = B - 1.
        self.width[fresh] = batch_max[fresh] * (1 + 1e-9) / _FINE_BINS
        while True:
            grow = (self.width > 0) & (batch_max >= self.width * _FINE_BINS)
            if not grow.any():
                return
            merged = self.counts[grow].view(-1, _FINE_BINS // 2, 2).sum(-1)
            self.counts[grow] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.width[grow] *= 2

    def shown(self, column: int, bins: int) -> Histogram:
        counts = self.counts[column].view(bins, _FINE_BINS // bins).sum(-1).tolist()
        while counts and counts[-1] == 0:
            counts.pop()
        if not counts:
            return Histogram([], [])
        step = float(self.width[column]) * (_FINE_BINS // bins)
        return Histogram(round_significant([step * i for i in range(len(counts) + 1)]), counts)

    def quantile_edges(self, quantiles: int, maxima: Tensor) -> Tensor:
        """(F, quantiles + 1) edges cutting each feature's active tokens into bins of about
        equal count (linear within a fine bin): 0, inner edges, the max."""
        counts = self.counts.double()
        cumulative = counts.cumsum(dim=1)  # (F, B)
        total = cumulative[:, -1:]
        targets = total * torch.arange(1, quantiles, device=counts.device) / quantiles
        index = torch.searchsorted(cumulative, targets).clamp(max=_FINE_BINS - 1)  # (F, Q - 1)
        before = torch.where(index > 0, cumulative.gather(1, (index - 1).clamp(min=0)), 0.0)
        inside = counts.gather(1, index).clamp(min=1)
        inner = self.width.unsqueeze(1) * (index + (targets - before) / inside)
        inner = torch.minimum(inner, maxima.double().unsqueeze(1))
        zero = torch.zeros_like(total)
        return torch.cat([zero, inner, maxima.double().unsqueeze(1)], dim=1).float()


class _LayerState:
    """Everything kept about one layer's chosen features while streaming."""

    def __init__(self, features: Tensor, options: _Options, device: torch.device) -> None:
        n = len(features)
        self.features = features.to(device)
        self.options = options
        self.n_tokens = 0
        self.n_active = torch.zeros(n, dtype=torch.long, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, device=device)
        self.histogram = _Histogram(n, device)
        self.top = _Reservoir(options.top, n, options.width, device)
        self.inactive = _Reservoir(options.inactive, n, options.width, device)
        self.edges: Tensor | None = None  # (F, Q + 1) once pass 2 starts
        self.bins: list[_Reservoir] = []
        self.bin_counts = torch.zeros((options.quantiles, n), dtype=torch.long, device=device)

    def observe(self, acts: Tensor, batch: _Batch, generator: torch.Generator) -> None:
        """Pass 1 over one batch: ``acts`` (B, T, F), zero at invalid positions."""
        valid = batch.valid.to(acts.device)
        active = acts > 0
        self.n_tokens += int(valid.sum())
        self.n_active += active.sum(dim=(0, 1))
        self.total += acts.sum(dim=(0, 1), dtype=torch.float64)
        self.max = torch.maximum(self.max, acts.amax(dim=(0, 1)))
        self.histogram.add(acts[valid])
        # Top contexts: each text's maximum, if active.
        best, where = acts.max(dim=1)  # (B, F)
        rows = torch.arange(acts.shape[0], device=acts.device).unsqueeze(1).expand_as(where)
        radius = self.options.radius
        self.top.offer(torch.where(best > 0, best, -math.inf), rows, where, acts, batch, radius)
        if self.inactive.size:
            # Silent windows: no active token within ``radius`` of the centre.
            spread = nnf.max_pool1d(
                active.float().transpose(1, 2), 2 * radius + 1, stride=1, padding=radius
            ).transpose(1, 2)  # (B, T, F)
            silent = (spread == 0) & valid.unsqueeze(-1)
            keys = torch.rand(acts.shape, generator=generator, device=acts.device)
            keys = torch.where(silent, keys, -math.inf).flatten(0, 1)
            self.inactive.offer_positions(keys, acts, batch, radius)

    def start_quantiles(self) -> None:
        options = self.options
        self.edges = self.histogram.quantile_edges(options.quantiles, self.max)
        device = self.max.device
        self.bins = [
            _Reservoir(options.per_quantile, len(self.features), options.width, device)
            for _ in range(options.quantiles)
        ]

    def sample_quantiles(self, acts: Tensor, batch: _Batch, generator: torch.Generator) -> None:
        """Pass 2 over one batch: a uniform sample of each bin's active tokens."""
        assert self.edges is not None
        flat = acts.flatten(0, 1)  # (B * T, F)
        inner = self.edges[:, 1:-1].contiguous()  # (F, Q - 1)
        # Bin j holds edges[j] < a <= edges[j + 1]: the count of inner edges below a.
        which = torch.searchsorted(inner, flat.T.contiguous()).T  # (B * T, F)
        active = flat > 0
        keys = torch.rand(flat.shape, generator=generator, device=flat.device)
        for j, reservoir in enumerate(self.bins):
            member = active & (which == j)
            self.bin_counts[j] += member.sum(dim=0)
            reservoir.offer_positions(
                torch.where(member, keys, -math.inf), acts, batch, self.options.radius
            )

    def dashboards(
        self,
        model_name: str,
        layer: int,
        logits: list[tuple[list[TokenLogit], list[TokenLogit]]],
        logits_layer: int | None,
        table: _TokenTable,
    ) -> list[FeatureDashboard]:
        options = self.options
        n_active = self.n_active.tolist()
        totals = self.total.tolist()
        maxima = self.max.tolist()
        found = []
        for column, feature in enumerate(self.features.tolist()):
            count = n_active[column]
            quantiles = []
            if self.edges is not None:
                edges = round_significant(self.edges[column].tolist())
                for j, reservoir in enumerate(self.bins):
                    contexts = reservoir.contexts(column, table)
                    contexts.sort(key=lambda c: -c.activation)
                    quantiles.append(
                        QuantileBin(
                            low=edges[j],
                            high=edges[j + 1],
                            n_active=int(self.bin_counts[j, column]),
                            contexts=contexts,
                        )
                    )
            top, bottom = logits[column] if logits else ([], [])
            found.append(
                FeatureDashboard(
                    model_name=model_name,
                    layer=layer,
                    feature=feature,
                    n_tokens=self.n_tokens,
                    n_active=count,
                    frequency=_round1(count / self.n_tokens if self.n_tokens else 0.0),
                    max_activation=_round1(maxima[column]),
                    mean_activation=_round1(totals[column] / count if count else 0.0),
                    top_contexts=self.top.contexts(column, table),
                    quantiles=quantiles,
                    top_logits=top,
                    bottom_logits=bottom,
                    histogram=self.histogram.shown(column, options.histogram_bins),
                    logits_layer=logits_layer,
                    inactive_contexts=self.inactive.contexts(column, table),
                )
            )
        return found


def _context(
    document: int, position: int, acts: Tensor, ids: Tensor, table: _TokenTable
) -> FeatureContext:
    """A context from a window (W,): positions with id -1 dropped."""
    id_list = ids.tolist()
    act_list = acts.tolist()
    centre = len(id_list) // 2
    keep = [i for i, token in enumerate(id_list) if token >= 0]
    token_ids = [id_list[i] for i in keep]
    return FeatureContext(
        document=document,
        position=position,
        index=sum(1 for i in keep if i < centre),
        tokens=table.tokens(token_ids),
        token_ids=token_ids,
        activations=round_significant([act_list[i] for i in keep]),
    )


# -- logits ---------------------------------------------------------------------------------


class _TokenTable:
    """Display strings of token ids, computed once per id."""

    def __init__(self, handle: ModelHandle) -> None:
        self.tokenizer = handle.tokenizer
        self.seen: dict[int, str] = {}

    def tokens(self, ids: list[int]) -> list[str]:
        new = sorted({i for i in ids if i not in self.seen})
        if new:
            self.seen.update(zip(new, display_tokens(self.tokenizer, new), strict=True))
        return [self.seen[i] for i in ids]


def _logit_tables(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    layer: int,
    features: Tensor,
    n: int,
    table: _TokenTable,
) -> tuple[list[tuple[list[TokenLogit], list[TokenLogit]]], int | None]:
    """Per feature (top n, bottom n) logits of its decoder direction (see the module
    docstring), and the layer whose decoder they read; ([], None) when the model has no
    unembedding or n is 0."""
    model = handle.model
    adapter = adapter_for(model)
    unembed = adapter.unembedding(model) if handle.architecture == "decoder" else None
    weight = getattr(unembed, "weight", None)
    if n == 0 or not isinstance(weight, Tensor):
        return [], None
    direction = transcoders.folded(layer).W_dec
    written = layer
    if direction.dim() == 3:  # a CLT: the decoder into the last layer it writes
        direction = direction[:, -1]
        written = transcoders.layers[-1]
    direction = direction[features.to(direction.device)]  # (F, d)
    norm = adapter.final_norm(model, transcoders.config.stack)
    unembedding = weight.detach().float()  # (V, d)
    found = []
    k = min(n, unembedding.shape[0])
    with torch.no_grad():
        for start in range(0, len(direction), 256):  # (256, V) logits at a time
            chunk = _through_norm(direction[start : start + 256].to(unembedding.device), norm)
            logits = chunk @ unembedding.T
            top = logits.topk(k, dim=-1)
            bottom = (-logits).topk(k, dim=-1)
            for row in range(len(chunk)):
                found.append(
                    (
                        _token_logits(top.values[row], top.indices[row], table),
                        _token_logits(-bottom.values[row], bottom.indices[row], table),
                    )
                )
    return found, written


def _through_norm(direction: Tensor, norm: nn.Module | None) -> Tensor:
    """``direction`` (F, d) as the final norm passes it on, its RMS/std division aside:
    LayerNorm centres it; the norm's weight scales it."""
    direction = direction.float()
    if norm is None:
        return direction
    if isinstance(norm, nn.LayerNorm):
        direction = direction - direction.mean(dim=-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor):
        direction = direction * weight.detach().float().to(direction.device)
    return direction


def _token_logits(values: Tensor, ids: Tensor, table: _TokenTable) -> list[TokenLogit]:
    id_list = [int(i) for i in ids.tolist()]
    return [
        TokenLogit(token, token_id, value)
        for token, token_id, value in zip(
            table.tokens(id_list), id_list, round_significant(values.tolist()), strict=True
        )
    ]


# -- rounding -------------------------------------------------------------------------------


def round_significant(values: Sequence[float]) -> list[float]:
    """``values`` to ``DIGITS`` significant digits."""
    x = np.asarray(values, dtype=np.float64)
    if not x.size:
        return []
    magnitude = np.floor(np.log10(np.abs(x), out=np.zeros_like(x), where=x != 0))
    scale = 10.0 ** (DIGITS - 1 - magnitude)
    return [float(v) for v in np.round(x * scale) / scale + 0.0]  # + 0.0: no -0.0


def _round1(value: float) -> float:
    return round_significant([value])[0]
