"""Attribution graphs on the local replacement model (Ameisen et al. 2025; circuit-tracer).

Nodes, in this order (circuit-tracer's):

- feature nodes: active transcoder features (layer, position, feature), ``n_features``;
- error nodes: one per (model layer, position), ``n_layers * n_tokens``, layer-major;
- token nodes: the prompt's token embeddings, ``n_tokens``;
- logit nodes: the most probable next tokens at the target position, up to a cumulative
  probability of ``desired_logit_prob`` and at most ``max_logits``.

``adjacency_matrix[target, source]`` is the direct linear effect of ``source`` on
``target`` in the local replacement model (see ``replacement``): the source's vector
(``a * W_dec`` row for a feature, the error term, the token embedding) dotted with the
gradient of the target's value with respect to where that vector is written. A feature
target's value is its pre-activation ``x @ W_enc + b_enc``; a logit target's is the logit
minus the mean logit over the vocabulary (the unembedding row minus the mean row). Because
the replacement model is affine in its sources, each target's value is the sum of its
incoming edges plus bias terms that no node carries (``b_enc``, ``b_dec``, attention and
norm biases, position embeddings, and what the excluded BOS position writes).

Edges are read with batched vector-Jacobian products: the replacement model runs once,
forward; then each batch of targets seeds one backward pass through
``torch.autograd.grad(..., is_grads_batched=True)`` (one batch row per target, several
layers' targets in one pass), and each row is read at every MLP output and at the embedding.

Pruning keeps the nodes and edges that carry most of the influence on the logits, where
influence sums the absolute, row-normalised adjacency over all path lengths (circuit-tracer's
``prune_graph``; see ``prune`` for one deliberate difference). Replacement and completeness
scores follow circuit-tracer's ``compute_graph_scores``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tzoo.circuits.replacement import (
    ReplacementModel,
    build_replacement,
    default_target_position,
    resolve_position,
)
from tzoo.circuits.transcoders import TranscoderSet
from tzoo.runtime.handle import ModelHandle

ProgressFn = Callable[[int, int], None]  # (target rows done, target rows in all)

DEFAULT_MAX_FEATURE_NODES = 4096
DEFAULT_BATCH_SIZE = 64


@dataclass(eq=False)
class AttributionGraph:
    """The unpruned attribution graph of one prompt; node order in the module docstring.

    ``active_features`` lists every active feature (layer, position, feature) outside the
    excluded BOS position, sorted; ``selected_features`` indexes the ones that are feature
    nodes (all of them unless ``max_feature_nodes`` capped them, then those with the most
    influence on the logits), in node order.
    """

    model_name: str
    prompt: str
    input_tokens: Tensor  # (T,) token ids
    token_strings: list[str]
    target_position: int  # 0..T-1, where the logit nodes are read
    n_layers: int  # model layers: error nodes per position
    transcoder_layers: tuple[int, ...]
    transcoder_kind: str
    active_features: Tensor  # (n_active, 3) long: layer, position, feature
    activation_values: Tensor  # (n_active,)
    selected_features: Tensor  # (n_features,) long, indices into active_features
    logit_tokens: Tensor  # (n_logits,) long
    logit_strings: list[str]
    logit_probabilities: Tensor  # (n_logits,)
    adjacency_matrix: Tensor  # (n_nodes, n_nodes) float32, [target, source]
    bos_excluded: bool  # position 0 was a special token: no features, zero error nodes there
    scan: str | None = None  # which transcoders (circuit-tracer's name for it)
    stats: dict[str, float] = field(default_factory=dict)  # timings, backward passes

    @property
    def n_tokens(self) -> int:
        return int(self.input_tokens.numel())

    @property
    def n_features(self) -> int:
        return int(self.selected_features.numel())

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_tokens

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_tokens

    def feature_node(self, layer: int, position: int, feature: int) -> int:
        """Node index of a feature, or KeyError when it is not a node of this graph."""
        chosen = self.active_features[self.selected_features]
        hits = (chosen == torch.tensor([layer, position, feature])).all(1).nonzero()
        if not len(hits):
            raise KeyError(f"Feature {feature} at layer {layer}, position {position} is no node.")
        return int(hits[0])

    def error_node(self, layer: int, position: int) -> int:
        return self.error_start + layer * self.n_tokens + position

    def token_node(self, position: int) -> int:
        return self.token_start + position

    def describe(self, node: int) -> dict[str, Any]:
        """What node ``node`` is: its kind and coordinates."""
        if node < self.error_start:
            layer, position, feature = self.active_features[self.selected_features[node]].tolist()
            return {"kind": "feature", "layer": layer, "position": position, "feature": feature}
        if node < self.token_start:
            layer, position = divmod(node - self.error_start, self.n_tokens)
            return {"kind": "error", "layer": layer, "position": position}
        if node < self.logit_start:
            position = node - self.token_start
            return {
                "kind": "token",
                "position": position,
                "token": int(self.input_tokens[position]),
            }
        k = node - self.logit_start
        return {
            "kind": "logit",
            "position": self.target_position,
            "token": int(self.logit_tokens[k]),
        }

    def logit_weights(self) -> Tensor:
        """(n_nodes,) each logit node's probability, 0 elsewhere: what influence is measured on."""
        weights = torch.zeros(self.n_nodes, device=self.adjacency_matrix.device)
        weights[self.logit_start :] = self.logit_probabilities.to(weights.device)
        return weights


# -- logit targets ----------------------------------------------------------------------------


class LogitTargets(NamedTuple):
    tokens: Tensor  # (k,) long
    probabilities: Tensor  # (k,)
    vectors: Tensor  # (k, d) unembedding rows minus the mean row
    biases: Tensor  # (k,) unembedding bias minus its mean (0 without one)


def salient_logits(
    logits: Tensor,
    unembedding: Tensor,
    bias: Tensor | None = None,
    *,
    max_logits: int = 10,
    desired_logit_prob: float = 0.95,
    include: Sequence[int] = (),
) -> LogitTargets:
    """The most probable tokens of ``logits`` (V,) until their probabilities add up to
    ``desired_logit_prob``, at most ``max_logits``; with each one's demeaned unembedding row,
    so that ``final @ vector + bias`` is that logit minus the mean logit. Tokens in
    ``include`` are targets too (after those), however unlikely (a question about a
    token the model does not favour)."""
    if max_logits < 1:
        raise ValueError("max_logits must be at least 1.")
    if not 0 < desired_logit_prob <= 1:
        raise ValueError("desired_logit_prob must lie in (0, 1].")
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top = probs.topk(min(max_logits, probs.numel()))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    top_p, top = top_p[:cutoff], top[:cutoff]
    extra = [int(t) for t in dict.fromkeys(include) if int(t) not in set(top.tolist())]
    for token in extra:
        if not 0 <= token < probs.numel():
            raise ValueError(
                f"Target token id {token} is outside the vocabulary (0..{probs.numel() - 1})."
            )
    if extra:
        chosen = torch.tensor(extra, dtype=top.dtype)
        top, top_p = torch.cat([top, chosen]), torch.cat([top_p, probs[chosen]])
    vectors = unembedding[top] - unembedding.mean(0, keepdim=True)
    biases = torch.zeros_like(top_p) if bias is None else bias[top] - bias.mean()
    return LogitTargets(top, top_p, vectors, biases)


# -- the backward passes ----------------------------------------------------------------------


class _Writers(NamedTuple):
    """What the sources write into one layer's MLP output, padded into blocks per position
    so that one batched matmul reads them all: ``vectors[p, :, i]`` is the i-th vector
    written at position p (zero padding) and ``columns[p * width + i]`` its source column
    (padding points at column 0, where it adds exact zeros)."""

    vectors: Tensor  # (T, d, width)
    columns: Tensor  # (T * width,) long


class AttributionContext:
    """The replacement model's graph, built once, and the source vectors to read it with.

    Columns of a row: every active feature (``features`` order), then error nodes
    (layer-major), then token nodes. A target is a vector injected at one (site, position):
    site ``l < n_layers`` is layer l's MLP input (a feature's encoder column), site
    ``n_layers`` is the final normed residual (a logit's demeaned unembedding row).
    """

    def __init__(
        self, replacement: ReplacementModel, features: Tensor, activations: Tensor, bos: bool
    ) -> None:
        rm = replacement
        self.replacement = rm
        self.n_layers, self.n_tokens = rm.n_layers, rm.n_tokens
        self.n_active = int(features.shape[0])
        self.n_columns = self.n_active + (self.n_layers + 1) * self.n_tokens
        self.embeddings = rm.embeddings.clone().requires_grad_(True)
        self.constants = [c.clone().requires_grad_(True) for c in rm.constants()]
        with torch.enable_grad():
            out = rm.forward(self.embeddings, self.constants)
        self.sites = [*out.mlp_inputs, out.final]  # what targets read, by site
        self.errors = rm.errors.clone()  # (L, T, d)
        if bos:
            self.errors[:, 0] = 0
        self.writers = self._writers(features, activations)

    def _writers(self, features: Tensor, activations: Tensor) -> list[_Writers | None]:
        rm = self.replacement
        device = self.errors.device
        clt = rm.transcoders.config.kind == "clt"
        layers = rm.layers
        # (columns, vectors) written into each (layer, position).
        groups: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for layer in layers:
            chosen = (features[:, 0] == layer).nonzero().squeeze(1)
            if not len(chosen):
                continue
            positions = features[chosen, 1]
            vectors = rm.decoder_vectors(layer, features[chosen, 2].to(device))
            weights = activations[chosen].to(vectors)
            vectors = vectors * weights.view(-1, *[1] * (vectors.dim() - 1))
            for position in positions.unique().tolist():
                at = (positions == position).nonzero().squeeze(1)
                if clt:  # a cross-layer feature writes to its own and every later layer
                    for offset, target in enumerate(layers[layers.index(layer) :]):
                        groups[target, position].append((chosen[at], vectors[at, offset]))
                else:
                    groups[layer, position].append((chosen[at], vectors[at]))
        writers: list[_Writers | None] = [None] * self.n_layers
        d, t = self.errors.shape[-1], self.n_tokens
        for layer in range(self.n_layers):
            here = {p: groups[layer, p] for p in range(t) if (layer, p) in groups}
            if not here:
                continue
            width = max(sum(len(c) for c, _ in parts) for parts in here.values())
            vectors = torch.zeros(t, d, width, device=device)
            columns = torch.zeros(t, width, dtype=torch.long, device=device)
            for position, parts in here.items():
                cols = torch.cat([c for c, _ in parts]).to(device)
                vectors[position, :, : len(cols)] = torch.cat([v for _, v in parts]).T
                columns[position, : len(cols)] = cols
            writers[layer] = _Writers(vectors, columns.flatten())
        return writers

    def rows(
        self, sites: Tensor, positions: Tensor, vectors: Tensor, *, batched: bool = True
    ) -> Tensor:
        """(B, n_columns) the direct effects of every source on B targets, each a vector
        (B, d) injected at (site, position): one backward pass for the whole batch
        (``batched``), or one per target."""
        if not batched:
            return torch.cat(
                [
                    self._backward(
                        sites[i : i + 1], positions[i : i + 1], vectors[i : i + 1], False
                    )
                    for i in range(len(sites))
                ]
            )
        return self._backward(sites, positions, vectors, True)

    def _backward(self, sites: Tensor, positions: Tensor, vectors: Tensor, batched: bool) -> Tensor:
        b = len(sites)
        outputs, seeds = [], []
        for site in sites.unique().tolist():
            rows = (sites == site).nonzero().squeeze(1)
            seed = torch.zeros(b, *self.sites[site].shape, device=vectors.device)
            seed[rows, positions[rows]] = vectors[rows]
            outputs.append(self.sites[site])
            seeds.append(seed if batched else seed[0])
        grads = torch.autograd.grad(
            outputs,
            [self.embeddings, *self.constants],
            seeds,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        if not batched:
            grads = tuple(None if g is None else g[None] for g in grads)
        return self._read(b, grads[0], list(grads[1:]))

    def _read(self, b: int, g_embed: Tensor | None, g_out: list[Tensor | None]) -> Tensor:
        """Rows from the gradients at the embedding (B, T, d) and MLP outputs (B, T, d)."""
        t = self.n_tokens
        rows = torch.zeros(b, self.n_columns, device=self.errors.device)
        error_rows = rows[:, self.n_active : self.n_active + self.n_layers * t].view(b, -1, t)
        for layer, grad in enumerate(g_out):
            if grad is None:
                continue
            error_rows[:, layer] = torch.einsum("btd,td->bt", grad, self.errors[layer])
            writer = self.writers[layer]
            if writer is not None:
                # (T, B, d) @ (T, d, width): every source's effect at every position at once;
                # index_add_ because a cross-layer feature writes to several layers.
                effects = torch.bmm(grad.transpose(0, 1), writer.vectors)  # (T, B, width)
                rows.index_add_(1, writer.columns, effects.transpose(0, 1).reshape(b, -1))
        if g_embed is not None:
            rows[:, -t:] = torch.einsum("btd,td->bt", g_embed, self.embeddings.detach())
        return rows


# -- influence, pruning, scores ---------------------------------------------------------------


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """|A| with each row (a target's incoming edges) scaled to sum to 1."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized: Tensor, weights: Tensor) -> Tensor:
    """``weights @ (A + A^2 + A^3 + ...)`` = ``weights @ ((I - A)^-1 - I)``: each node's
    influence on the weighted targets over paths of every length. The graph is acyclic, so
    the series ends (exactly: products of structurally zero entries stay zero)."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(normalized.shape[0] + 1):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError("Influence did not converge: the adjacency matrix has a cycle.")


def _score_threshold(scores: Tensor, keep: float) -> Tensor:
    """The smallest score among the top ones that together hold ``keep`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return torch.tensor(float("inf"), device=scores.device)
    cumulative = ordered.cumsum(0) / total
    index = min(int(torch.searchsorted(cumulative, torch.tensor(keep))), len(ordered) - 1)
    return ordered[index]


class PruneResult(NamedTuple):
    node_mask: Tensor  # (n_nodes,) bool
    edge_mask: Tensor  # (n_nodes, n_nodes) bool, [target, source]
    cumulative_scores: (
        Tensor  # (n_nodes,) share of total influence held by nodes at least as influential
    )
    node_influence: Tensor  # (n_nodes,)


def prune(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PruneResult:
    """The nodes and edges that carry ``node_threshold`` of the total node influence and
    ``edge_threshold`` of the total edge influence on the logits. Token and logit nodes are
    always kept; a feature or error node left without a kept outgoing edge, or a feature
    left without a kept incoming one, goes too (repeatedly, until none does).

    Unlike circuit-tracer, edge influence is measured on the whole graph rather than on the
    graph left after node pruning: then every edge's score is fixed, so a higher threshold
    keeps a superset of nodes and edges (pruning is monotone in both thresholds), and an
    edge's score does not depend on which other nodes survived.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in 0..1; got {value}.")
    adjacency = graph.adjacency_matrix.float()
    weights = graph.logit_weights()
    normalized = normalized_adjacency(adjacency)
    node_influence = influence(normalized, weights)
    node_mask = node_influence >= _score_threshold(node_influence, node_threshold)
    node_mask[graph.token_start :] = True

    edge_scores = normalized * (node_influence + weights)[:, None]
    edge_mask = (edge_scores >= _score_threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    internal = graph.token_start  # feature and error nodes: they must lead somewhere
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        before = node_mask.clone()
        node_mask[:internal] &= edge_mask[:, :internal].any(0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
        if torch.equal(before, node_mask):
            break

    ordered, order = node_influence.sort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-10)
    return PruneResult(node_mask, edge_mask, cumulative, node_influence)


class GraphScores(NamedTuple):
    replacement: float  # share of token -> logit influence that flows through features
    completeness: float  # influence-weighted share of incoming edges that are not errors


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """circuit-tracer's replacement and completeness scores of the (unpruned) graph."""
    weights = graph.logit_weights()
    normalized = normalized_adjacency(graph.adjacency_matrix.float())
    node_influence = influence(normalized, weights)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = node_influence[graph.token_start : graph.logit_start].sum()
    error_influence = node_influence[errors].sum()
    denominator = token_influence + error_influence
    replacement = float(token_influence / denominator) if denominator > 0 else 0.0
    non_error = 1 - normalized[:, errors].sum(dim=1)
    output_influence = node_influence + weights
    completeness = float((non_error * output_influence).sum() / output_influence.sum())
    return GraphScores(replacement, completeness)


# -- attribution ------------------------------------------------------------------------------


def active_features(replacement: ReplacementModel, *, exclude_bos: bool) -> tuple[Tensor, Tensor]:
    """(n, 3) (layer, position, feature) of every nonzero activation, sorted, and (n,) the
    activations; position 0 left out with ``exclude_bos``."""
    rows, values = [], []
    for layer in replacement.layers:
        acts = replacement.activations[layer].clone()
        if exclude_bos:
            acts[0] = 0
        positions, feats = acts.nonzero(as_tuple=True)
        rows.append(torch.stack([torch.full_like(positions, layer), positions, feats], dim=1))
        values.append(acts[positions, feats])
    return torch.cat(rows).cpu(), torch.cat(values)


def starts_with_special(handle_tokenizer: Any, input_ids: Tensor) -> bool:
    special = set(getattr(handle_tokenizer, "all_special_ids", []) or [])
    return int(input_ids[0]) in special


def attribute(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    prompt: str | Sequence[int],
    *,
    target_position: int | None = None,
    max_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_bos: bool = True,
    target_tokens: Sequence[int] = (),
    progress: ProgressFn | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` on ``handle``'s model with ``transcoders``.

    ``target_position``: where the logit nodes are read (any position, negative ones from
    the end); default a decoder's last token, an encoder's first mask token.
    ``max_feature_nodes``: at most this many feature nodes (None: every active feature);
    when capped, the features with the most influence on the logits are kept, found as
    circuit-tracer does by ranking them on the partial graph between batches.
    ``batch_size``: targets per backward pass. ``exclude_bos``: when the first token is a
    special token, its features and errors are not nodes (circuit-tracer's ``zero_bos``;
    the BOS position's outsized activations would dominate every graph).
    ``target_tokens``: token ids that are logit targets whatever their probability.
    ``progress(done, total)`` after each batch of target rows.
    """
    replacement = build_replacement(handle, transcoders, prompt)
    bos = exclude_bos and starts_with_special(handle.tokenizer, replacement.input_ids)
    graph = attribute_replacement(
        replacement,
        target_position=target_position,
        max_logits=max_logits,
        desired_logit_prob=desired_logit_prob,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        exclude_bos=bos,
        target_tokens=target_tokens,
        progress=progress,
    )
    graph.prompt = prompt if isinstance(prompt, str) else handle.tokenizer.decode(list(prompt))
    return graph


def attribute_replacement(
    replacement: ReplacementModel,
    *,
    target_position: int | None = None,
    max_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_bos: bool = False,
    batched: bool = True,
    update_interval: int = 4,
    target_tokens: Sequence[int] = (),
    progress: ProgressFn | None = None,
) -> AttributionGraph:
    """``attribute`` on a replacement model already built (``exclude_bos`` applies as
    given). ``batched=False`` runs one backward pass per target (the naive baseline)."""
    started = time.perf_counter()
    rm = replacement
    if target_position is None:
        target_position = default_target_position(rm.handle, rm.input_ids)
    position = resolve_position(target_position, rm.n_tokens)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError("max_feature_nodes must be at least 0.")
    features, activations = active_features(rm, exclude_bos=exclude_bos)
    targets = salient_logits(
        rm.logits[position],
        rm.parts.unembedding,
        rm.parts.unembedding_bias,
        max_logits=max_logits,
        desired_logit_prob=desired_logit_prob,
        include=target_tokens,
    )
    ctx = AttributionContext(rm, features, activations, exclude_bos)
    n_active, n_logits = ctx.n_active, len(targets.tokens)
    cap = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    total_rows = n_logits + cap
    rows = torch.zeros(total_rows, ctx.n_columns, device=rm.mlp_in.device)
    row_nodes = torch.zeros(total_rows, dtype=torch.long)  # column index, or n_columns + k
    n_backward = 0

    def compute(start: int, sites: Tensor, positions: Tensor, vectors: Tensor) -> None:
        nonlocal n_backward
        rows[start : start + len(sites)] = ctx.rows(sites, positions, vectors, batched=batched)
        n_backward += 1 if batched else len(sites)
        if progress is not None:
            progress(start + len(sites), total_rows)

    device = rm.mlp_in.device
    for start in range(0, n_logits, batch_size):
        chunk = torch.arange(start, min(start + batch_size, n_logits))
        compute(
            start,
            torch.full((len(chunk),), rm.n_layers),
            torch.full((len(chunk),), position),
            targets.vectors[chunk],
        )
        row_nodes[chunk] = ctx.n_columns + chunk

    visited = torch.zeros(n_active, dtype=torch.bool)
    filled = n_logits
    while filled < total_rows:
        if cap == n_active:
            # Every feature is a node: order by layer so a batch's backward pass stops early.
            pending = torch.arange(n_active)
        else:
            ranking = _partial_influence(rows[:filled], row_nodes[:filled], targets.probabilities)
            order = ranking[:n_active].cpu().argsort(descending=True)
            pending = order[~visited[order]][
                : min(update_interval * batch_size, cap - filled + n_logits)
            ]
            pending = pending[features[pending, 0].argsort(stable=True)]
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            layer_ids, positions, ids = features[chunk].T
            vectors = _encoder_columns(rm, layer_ids, ids)
            compute(filled, layer_ids.to(device), positions.to(device), vectors)
            row_nodes[filled : filled + len(chunk)] = chunk
            visited[chunk] = True
            filled += len(chunk)

    graph = _assemble(rm, features, activations, targets, rows, row_nodes, visited, position)
    graph.bos_excluded = exclude_bos
    graph.stats = {
        "seconds": time.perf_counter() - started,
        "backward_passes": float(n_backward),
        "active_features": float(n_active),
        "edges": float((graph.adjacency_matrix != 0).sum()),
    }
    return graph


def _encoder_columns(rm: ReplacementModel, layers: Tensor, features: Tensor) -> Tensor:
    """(n, d) the encoder column of each (layer, feature): what a feature target reads."""
    out = torch.empty(len(layers), rm.mlp_in.shape[-1], device=rm.mlp_in.device)
    for layer in layers.unique().tolist():
        at = (layers == layer).nonzero().squeeze(1)
        out[at.to(out.device)] = rm.folded[layer].W_enc[:, features[at].to(out.device)].T
    return out


def _partial_influence(rows: Tensor, row_nodes: Tensor, logit_probs: Tensor) -> Tensor:
    """Influence on the logits of every column, over the rows computed so far (a target's
    row only passes influence on once it has been computed)."""
    normalized = normalized_adjacency(rows)
    n_columns = rows.shape[1]
    weights = torch.zeros(n_columns + len(logit_probs), device=rows.device)
    weights[n_columns:] = logit_probs.to(rows.device)
    total = torch.zeros(n_columns, device=rows.device)
    current = weights
    for _ in range(len(row_nodes) + 1):
        spread = current[row_nodes.to(rows.device)] @ normalized  # (n_columns,)
        if not spread.any():
            return total
        total += spread
        current = torch.cat([spread, torch.zeros_like(weights[n_columns:])])
    raise RuntimeError("Influence did not converge.")


def _assemble(
    rm: ReplacementModel,
    features: Tensor,
    activations: Tensor,
    targets: LogitTargets,
    rows: Tensor,
    row_nodes: Tensor,
    visited: Tensor,
    position: int,
) -> AttributionGraph:
    """The dense adjacency in node order from rows in computation order."""
    selected = visited.nonzero().squeeze(1)
    n_active, n_sel, n_logits = len(features), len(selected), len(targets.tokens)
    rest = rows.shape[1] - n_active  # error and token columns
    columns = torch.cat([selected, torch.arange(n_active, n_active + rest)]).to(rows.device)
    n_nodes = n_sel + rest + n_logits
    # Node index of each computed row: features by their rank among the selected ones.
    node_of_active = torch.full((n_active,), -1, dtype=torch.long)
    node_of_active[selected] = torch.arange(n_sel)
    is_logit = row_nodes >= rows.shape[1]
    node_rows = torch.where(
        is_logit,
        row_nodes - rows.shape[1] + n_sel + rest,
        node_of_active[row_nodes.clamp(max=n_active - 1)] if n_active else row_nodes,
    )
    adjacency = torch.zeros(n_nodes, n_nodes, device=rows.device)
    adjacency[node_rows.to(rows.device), : n_sel + rest] = rows[:, columns]
    return AttributionGraph(
        model_name=rm.model_name,
        prompt=rm.handle.tokenizer.decode(rm.input_ids.tolist()),
        input_tokens=rm.input_ids.cpu(),
        token_strings=rm.token_strings,
        target_position=position,
        n_layers=rm.n_layers,
        transcoder_layers=rm.layers,
        transcoder_kind=rm.transcoders.config.kind,
        active_features=features,
        activation_values=activations.cpu(),
        selected_features=selected,
        logit_tokens=targets.tokens.cpu(),
        logit_strings=[rm.handle.tokenizer.decode([int(i)]) for i in targets.tokens],
        logit_probabilities=targets.probabilities.cpu(),
        adjacency_matrix=adjacency.cpu(),
        bos_excluded=False,
        scan=f"{rm.model_name}-{rm.transcoders.config.kind}",
    )
