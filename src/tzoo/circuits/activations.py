"""MLP (input, output) pairs streamed from a model, for training and evaluating transcoders.

A corpus is tokenized into one stream (documents joined by the end-of-sequence token) and
cut into windows of ``seq_len`` tokens (``tzoo.analyses.tuned_lens.token_windows``). One
forward pass over a batch of windows records, for every chosen layer, what the MLP reads
(``{stack}.{layer}.mlp_in``) and what it adds (``{stack}.{layer}.mlp_out``), and is stopped
right after the last chosen layer's MLP: training transcoders for layers 0-3 of a 30-layer
model runs 4 blocks, not 30 plus the unembedding.

Position 0 of every window is dropped. A decoder's first position is an attention sink
whose activations are orders of magnitude larger than the rest (smollm2's layer-0 MLP input
norms sit near 2.5 everywhere else); circuit-tracer likewise zeroes the features there
(``zero_positions=slice(0, 1)``) and leaves that position to error nodes.

Nothing is held beyond one batch: ``stream_mlp_pairs`` yields batch after batch, and
``mean_norms`` reduces a stream to the mean norms ``TranscoderSet.set_scales`` wants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import PatchFn, patch

Tensor = torch.Tensor
SKIPPED_POSITIONS = 1  # positions at the start of every window left out (the attention sink)


@dataclass(frozen=True)
class MLPBatch:
    """One batch of MLP activations, float32, on the model's device, by model layer."""

    inputs: dict[int, Tensor]  # layer -> (N, d_model): what the MLP reads
    outputs: dict[int, Tensor]  # layer -> (N, d_model): what the MLP adds to the residual

    @property
    def n_tokens(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


class _StopForward(Exception):
    """Raised from a hook once every activation needed is recorded."""


def collect_mlp_pairs(
    handle: ModelHandle,
    ids: Tensor,
    layers: Sequence[int],
    *,
    stack: str = "decoder",
    input_site: str = "mlp_in",
    output_site: str = "mlp_out",
    skip_first: int = SKIPPED_POSITIONS,
) -> MLPBatch:
    """The MLP inputs and outputs of ``layers`` for token ids ``ids`` (B, T), positions
    ``skip_first..T-1`` of every row flattened into (B * (T - skip_first), d_model).

    The forward pass stops after the last layer's MLP. The caller holds the model (hooks
    are installed on it for the call)."""
    if not layers:
        raise ValueError("collect_mlp_pairs needs at least one layer.")
    if ids.dim() != 2 or ids.shape[1] <= skip_first:
        raise ValueError(f"ids must be (batch, T) with T > {skip_first}; got {tuple(ids.shape)}.")
    last = max(layers)
    store: dict[str, Tensor] = {}

    def recorder(name: str, stop: bool) -> PatchFn:
        def record(value: Tensor) -> None:
            # (B, T, d) -> (B * (T - skip), d); a copy, so later in-place edits cannot reach it
            store[name] = value[:, skip_first:].reshape(-1, value.shape[-1]).float().clone()
            if stop:
                raise _StopForward

        return record

    fns = {}
    for layer in layers:
        fns[f"{stack}.{layer}.{input_site}"] = recorder(f"in.{layer}", stop=False)
        fns[f"{stack}.{layer}.{output_site}"] = recorder(f"out.{layer}", stop=layer == last)
    device = next(handle.model.parameters()).device
    try:
        with torch.no_grad(), patch(handle, fns):
            handle.model(input_ids=ids.to(device), use_cache=False)
    except _StopForward:
        pass
    return MLPBatch(
        inputs={layer: store[f"in.{layer}"] for layer in layers},
        outputs={layer: store[f"out.{layer}"] for layer in layers},
    )


def stream_mlp_pairs(
    handle: ModelHandle,
    windows: Tensor,
    layers: Sequence[int],
    *,
    windows_per_batch: int,
    order: Iterable[int] | None = None,
    stack: str = "decoder",
    input_site: str = "mlp_in",
    output_site: str = "mlp_out",
) -> Iterator[MLPBatch]:
    """Batches of ``windows_per_batch`` windows (rows of ``windows``, (n, T)) in ``order``
    (default: first to last), one forward pass each; see ``collect_mlp_pairs``."""
    if windows_per_batch < 1:
        raise ValueError(f"windows_per_batch must be at least 1; got {windows_per_batch}.")
    picked = list(range(windows.shape[0]) if order is None else order)
    for start in range(0, len(picked), windows_per_batch):
        rows = picked[start : start + windows_per_batch]
        yield collect_mlp_pairs(
            handle,
            windows[rows],
            layers,
            stack=stack,
            input_site=input_site,
            output_site=output_site,
        )


def mean_norms(batches: Iterable[MLPBatch]) -> tuple[dict[int, float], dict[int, float]]:
    """(input norms, output norms): the mean L2 norm per token of each layer's MLP input
    and output over every batch, the arguments of ``TranscoderSet.set_scales``."""
    sums_in: dict[int, float] = {}
    sums_out: dict[int, float] = {}
    count = 0
    for batch in batches:
        for layer, x in batch.inputs.items():
            sums_in[layer] = sums_in.get(layer, 0.0) + float(x.norm(dim=-1).double().sum())
        for layer, y in batch.outputs.items():
            sums_out[layer] = sums_out.get(layer, 0.0) + float(y.norm(dim=-1).double().sum())
        count += batch.n_tokens
    if count == 0:
        raise ValueError("No activations to measure norms on.")
    return (
        {layer: total / count for layer, total in sums_in.items()},
        {layer: total / count for layer, total in sums_out.items()},
    )
