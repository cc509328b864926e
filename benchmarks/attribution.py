"""Attribution graph time and edges per second for one prompt, batched backward passes
against a naive baseline with one backward pass per target node.

Ours: ``attribute`` (the replacement model's graph built once; each batch of
``--batch-size`` targets, feature pre-activations and logits, read in one backward pass
with ``torch.autograd.grad(..., is_grads_batched=True)``).

Naive: the same code path with one ``torch.autograd.grad`` call per target, which is what a
straightforward implementation does. Both choose the same feature nodes (influence ranking
between batches) and the benchmark checks that they give the same adjacency matrix.

circuit-tracer itself (PyPI 0.5.0) is not run: it requires transformers <= 4.57.3 (this
project uses 5.x), TransformerLens and nnsight, so it cannot be installed beside the project
without replacing its transformers; and its loaders expect its own hub-hosted transcoders.

Transcoders: a set saved under TZOO_TRANSCODERS_DIR/<model>/ (``tzoo transcoders train``)
when there is one, else random per-layer transcoders on every layer whose input and output
scales are fitted on the prompt, thresholds set so about ``--l0`` features fire per token
and layer.

    .venv/bin/python benchmarks/attribution.py [--model smollm2-135m] [--max-feature-nodes 512]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from tzoo.circuits.attribution import (
    AttributionGraph,
    attribute_replacement,
    graph_scores,
    prune,
    starts_with_special,
)
from tzoo.circuits.replacement import build_replacement
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.config import Settings, get_settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

PROMPT = "Fact: the capital of the state containing Dallas is"


def saved_transcoders(handle: ModelHandle, settings: Settings) -> TranscoderSet | None:
    """The first set saved for this model that loads and fits it, if any."""
    try:
        from tzoo.circuits.io import load_transcoders, transcoders_root
    except ImportError:
        return None
    root = transcoders_root(settings)
    for folder in sorted(root.glob("*/*")) if root.is_dir() else []:
        try:
            transcoders = load_transcoders(folder, handle=handle)
        except Exception:  # a set for another model, or a half-written one
            continue
        if transcoders.config.model_name == handle.name:
            print(f"transcoders: saved set {folder}")
            return transcoders
    return None


@torch.no_grad()
def random_transcoders(handle: ModelHandle, n_features: int, l0: float) -> TranscoderSet:
    """Random per-layer transcoders on every layer, scaled on the prompt's MLP inputs and
    outputs; JumpReLU thresholds at the pre-activation quantile that leaves ``l0`` active."""
    config = TranscoderConfig(
        model_name=handle.name,
        kind="plt",
        d_model=handle.d_model,
        n_features=n_features,
        layers=tuple(range(handle.n_layers)),
        n_model_layers=handle.n_layers,
    )
    transcoders = TranscoderSet(config, seed=0)
    g = torch.Generator().manual_seed(1)
    for i in range(handle.n_layers):
        transcoders.W_enc[i].copy_(torch.randn(handle.d_model, n_features, generator=g))
        transcoders.W_enc[i].div_(math.sqrt(handle.d_model))
    probe = build_replacement(handle, transcoders, PROMPT)
    transcoders.set_scales(
        {layer: float(probe.mlp_in[layer].norm(dim=-1).mean()) for layer in config.layers},
        {layer: float(probe.mlp_out[layer].norm(dim=-1).mean()) for layer in config.layers},
    )
    # pre ~ N(0, 1) once inputs have norm sqrt(d): the threshold keeping l0 of n_features.
    quantile = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / n_features))
    for i in range(handle.n_layers):
        transcoders.threshold[i].fill_(float(quantile))
    print(
        f"transcoders: random per-layer, {n_features} features x {handle.n_layers} layers, "
        f"threshold {float(quantile):.2f} (about {l0:g} active per token and layer)"
    )
    return transcoders


def timed(run: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def describe(name: str, graph: AttributionGraph, seconds: float) -> None:
    edges = int((graph.adjacency_matrix != 0).sum())
    print(
        f"{name:>6}: {seconds:7.2f} s, {int(graph.stats['backward_passes']):5d} backward "
        f"passes, {graph.n_nodes} nodes, {edges} edges, {edges / seconds:,.0f} edges/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: TZOO_CACHE_DIR")
    parser.add_argument("--max-feature-nodes", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=2048, help="random transcoders' width")
    parser.add_argument("--l0", type=float, default=16.0, help="random transcoders' L0")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = get_settings()
    if args.cache_dir is not None:
        settings = Settings(cache_dir=args.cache_dir, data_dir=args.cache_dir / "data")
    handle, load_s = timed(lambda: ModelManager(settings).get(args.model))
    print(
        f"model: {args.model} on {handle.device} ({handle.dtype}), {handle.n_layers} layers, "
        f"d_model {handle.d_model}, loaded in {load_s:.1f} s; torch threads "
        f"{torch.get_num_threads()}"
    )
    transcoders = saved_transcoders(handle, settings) or random_transcoders(
        handle, args.features, args.l0
    )
    rm, build_s = timed(lambda: build_replacement(handle, transcoders, PROMPT))
    bos = starts_with_special(handle.tokenizer, rm.input_ids)
    print(f"prompt: {PROMPT!r}, {rm.n_tokens} tokens; replacement model built in {build_s:.2f} s")

    options = {"max_feature_nodes": args.max_feature_nodes, "exclude_bos": bos}
    ours, ours_s = timed(lambda: attribute_replacement(rm, batch_size=args.batch_size, **options))
    print(
        f"graph: {int(ours.stats['active_features'])} active features, {ours.n_features} "
        f"feature nodes (cap {args.max_feature_nodes}), {ours.n_logits} logit nodes "
        f"(p = {float(ours.logit_probabilities.sum()):.3f})"
    )
    describe("ours", ours, ours_s)
    if not args.skip_naive:
        naive, naive_s = timed(
            lambda: attribute_replacement(rm, batch_size=args.batch_size, batched=False, **options)
        )
        describe("naive", naive, naive_s)
        same = torch.equal(naive.selected_features, ours.selected_features)
        diff = (naive.adjacency_matrix - ours.adjacency_matrix).abs().max()
        print(
            f"same feature nodes: {same}; max |adjacency ours - naive| {diff:.2e}; "
            f"ratio naive / ours: {naive_s / ours_s:.2f}x"
        )
    pruned, prune_s = timed(lambda: prune(ours))
    scores = graph_scores(ours)
    print(
        f"pruned (0.8 / 0.98) in {prune_s:.2f} s: {int(pruned.node_mask.sum())} nodes, "
        f"{int(pruned.edge_mask.sum())} edges; replacement score {scores.replacement:.3f}, "
        f"completeness {scores.completeness:.3f}"
    )


if __name__ == "__main__":
    main()
