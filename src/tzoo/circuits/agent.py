"""The circuit agent: given a prompt and a target token, the strongest paths in the
attribution graph that lead to that token's logit, with a label for each feature on them.

How: ``attribute`` with the target token forced among the logit targets; then a beam
search backwards from the target's logit node over the normalised adjacency (each node's
incoming edges scaled to sum to 1 in absolute value, as influence is computed), so a path's
strength is the product of the shares it takes at each step: the fraction of the target's
direct attribution that flows along it. Paths end at a token embedding or an error node
(neither has incoming edges). Each step keeps its signed raw edge weight, so a path that
suppresses the target shows as such. Features on the paths get dashboards over the
shipped corpus and a label from the explainer (``labels.explainer_from_settings``: the
bundled instruct model or an OpenAI-compatible endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tzoo.circuits.attribution import AttributionGraph, attribute, normalized_adjacency
from tzoo.circuits.transcoders import TranscoderSet
from tzoo.runtime.handle import ModelHandle

ProgressFn = Callable[[str, int, int], None]


class TargetTokenError(ValueError):
    """The target is not one token of the model's vocabulary."""


@dataclass(frozen=True)
class PathStep:
    node: int
    kind: str  # feature | error | token | logit
    layer: int | None
    position: int
    feature: int | None
    text: str  # the token (token and logit nodes) or a short description
    edge_to_next: float | None  # signed raw weight of the edge into the next step
    label: str | None = None  # features only, when labelled


@dataclass(frozen=True)
class CircuitPath:
    steps: list[PathStep]  # source first, the target logit last
    strength: float  # product of normalised shares along the path (0..1)
    sign: int  # +1 when the product of the signed weights is positive

    def describe(self) -> str:
        return " -> ".join(_step_text(step) for step in self.steps)


@dataclass
class CircuitAnswer:
    prompt: str
    target_token: int
    target_text: str
    target_probability: float
    target_position: int
    paths: list[CircuitPath]
    labels: dict[str, str] = field(default_factory=dict)  # "layer/feature" -> label
    graph_stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_token_id(handle: ModelHandle, target: str | int) -> int:
    """The id of ``target``: an id, or a text that is exactly one token (a leading space
    matters: " Paris" and "Paris" are different tokens)."""
    vocab = int(handle.config.vocab_size)
    if isinstance(target, int):
        if not 0 <= target < vocab:
            raise TargetTokenError(f"Token id {target} is outside the vocabulary (0..{vocab - 1}).")
        return target
    ids = handle.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TargetTokenError("The target is empty: give the text of one token, e.g. ' Paris'.")
    if len(ids) != 1:
        pieces = [handle.tokenizer.decode([i]) for i in ids]
        raise TargetTokenError(
            f"The target {target!r} is {len(ids)} tokens ({pieces}); give one token, e.g. "
            f"{pieces[0]!r} if any."
        )
    return int(ids[0])


def strongest_paths(
    graph: AttributionGraph,
    target_node: int,
    *,
    n_paths: int = 5,
    beam_width: int = 32,
    branching: int = 8,
    max_length: int = 64,
) -> list[CircuitPath]:
    """The ``n_paths`` strongest paths into ``target_node`` (a beam search backwards over
    the normalised adjacency; see the module docstring)."""
    if n_paths < 1 or beam_width < 1 or branching < 1:
        raise ValueError("n_paths, beam_width and branching must be at least 1.")
    adjacency = graph.adjacency_matrix
    shares = normalized_adjacency(adjacency)
    # A beam entry: (strength, nodes from the target backwards).
    beam: list[tuple[float, list[int]]] = [(1.0, [target_node])]
    done: list[tuple[float, list[int]]] = []
    for _ in range(max_length):
        grown: list[tuple[float, list[int]]] = []
        for strength, nodes in beam:
            row = shares[nodes[-1]]
            if not row.any():
                done.append((strength, nodes))  # a source: tokens and errors
                continue
            values, sources = row.topk(min(branching, int((row > 0).sum())))
            for value, source in zip(values.tolist(), sources.tolist(), strict=True):
                grown.append((strength * value, [*nodes, int(source)]))
        if not grown:
            break
        grown.sort(key=lambda entry: entry[0], reverse=True)
        beam = grown[:beam_width]
        if len(done) >= n_paths and beam[0][0] <= sorted(s for s, _ in done)[-n_paths]:
            break  # nothing left in the beam can beat the paths found
    done.sort(key=lambda entry: entry[0], reverse=True)
    return [_path(graph, nodes[::-1], strength) for strength, nodes in done[:n_paths]]


def explain_circuit(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    prompt: str,
    target: str | int,
    *,
    target_position: int | None = None,
    n_paths: int = 5,
    max_feature_nodes: int | None = 1024,
    label: bool = True,
    explainer: Any = None,
    corpus: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> CircuitAnswer:
    """The strongest paths from the prompt to ``target`` at ``target_position``, with
    labels for their features when ``label`` (``explainer``: any ``labels.Explainer``;
    default from the settings; ``corpus``: texts for the dashboards, default the shipped
    corpus). ``progress(stage, done, total)`` reports the graph, dashboards and labels."""
    token = target_token_id(handle, target)

    def graph_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("graph", done, total)

    graph = attribute(
        handle,
        transcoders,
        prompt,
        target_position=target_position,
        max_feature_nodes=max_feature_nodes,
        target_tokens=[token],
        progress=graph_progress,
    )
    k = graph.logit_tokens.tolist().index(token)
    paths = strongest_paths(graph, graph.logit_start + k, n_paths=n_paths)
    answer = CircuitAnswer(
        prompt=graph.prompt,
        target_token=token,
        target_text=graph.logit_strings[k],
        target_probability=float(graph.logit_probabilities[k]),
        target_position=graph.target_position,
        paths=paths,
        graph_stats=dict(graph.stats),
    )
    if label:
        answer.labels = _label_features(handle, transcoders, paths, explainer, corpus, progress)
        answer.paths = [_labelled(path, answer.labels) for path in paths]
    return answer


def _label_features(
    handle: ModelHandle,
    transcoders: TranscoderSet,
    paths: list[CircuitPath],
    explainer: Any,
    corpus: Sequence[str] | None,
    progress: ProgressFn | None,
) -> dict[str, str]:
    from tzoo.analyses.corpus import shipped_corpus
    from tzoo.circuits.features import build_dashboards
    from tzoo.circuits.labels import explain_feature, explainer_from_settings
    from tzoo.config import get_settings
    from tzoo.runtime.manager import ModelManager

    wanted: dict[int, list[int]] = {}
    for path in paths:
        for step in path.steps:
            if step.kind == "feature" and step.layer is not None and step.feature is not None:
                features = wanted.setdefault(step.layer, [])
                if step.feature not in features:
                    features.append(step.feature)
    if not wanted:
        return {}
    texts = list(corpus) if corpus is not None else shipped_corpus()

    def dashboard_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("dashboards", done, total)

    dashboards = build_dashboards(
        handle, transcoders, texts, features=wanted, progress=dashboard_progress
    )
    if explainer is None:
        settings = get_settings()
        explainer = explainer_from_settings(settings, ModelManager(settings))
    labels: dict[str, str] = {}
    for done, ((layer, feature), dashboard) in enumerate(sorted(dashboards.items()), start=1):
        labels[f"{layer}/{feature}"] = (
            explain_feature(dashboard, explainer) if dashboard.n_active else "(never active)"
        )
        if progress is not None:
            progress("labels", done, len(dashboards))
    return labels


def _labelled(path: CircuitPath, labels: dict[str, str]) -> CircuitPath:
    steps = [
        PathStep(**{**asdict(step), "label": labels.get(f"{step.layer}/{step.feature}")})
        if step.kind == "feature"
        else step
        for step in path.steps
    ]
    return CircuitPath(steps=steps, strength=path.strength, sign=path.sign)


def _path(graph: AttributionGraph, nodes: list[int], strength: float) -> CircuitPath:
    adjacency = graph.adjacency_matrix
    steps = []
    sign = 1
    for i, node in enumerate(nodes):
        info = graph.describe(node)
        edge = float(adjacency[nodes[i + 1], node]) if i + 1 < len(nodes) else None
        if edge is not None and edge < 0:
            sign = -sign
        steps.append(
            PathStep(
                node=node,
                kind=info["kind"],
                layer=info.get("layer"),
                position=int(info["position"]),
                feature=info.get("feature"),
                text=_node_text(graph, info),
                edge_to_next=edge,
            )
        )
    return CircuitPath(steps=steps, strength=float(strength), sign=sign)


def _node_text(graph: AttributionGraph, info: dict[str, Any]) -> str:
    if info["kind"] == "token":
        return graph.token_strings[info["position"]]
    if info["kind"] == "logit":
        k = graph.logit_tokens.tolist().index(info["token"])
        return graph.logit_strings[k]
    if info["kind"] == "error":
        return f"error L{info['layer']}"
    return f"L{info['layer']} #{info['feature']}"


def _step_text(step: PathStep) -> str:
    at = f"@{step.position}"
    if step.kind == "feature":
        name = f"L{step.layer}#{step.feature}{at}"
        return f"{name} ({step.label})" if step.label else name
    return f"{step.kind} {step.text!r}{at}"


__all__ = [
    "CircuitAnswer",
    "CircuitPath",
    "PathStep",
    "TargetTokenError",
    "explain_circuit",
    "strongest_paths",
    "target_token_id",
]
