"""circuit-tracer's graph JSON: what its front end (and Neuronpedia) draws, written from a
pruned ``AttributionGraph`` and read back.

The file (circuit-tracer ``frontend/graph_models.py``, schema version 1)::

    {"metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt",
                  "node_threshold", "schema_version"},
     "qParams":  {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"},
     "nodes":    [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                   "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
                   "influence", "activation"}, ...],
     "links":    [{"source", "target", "weight"}, ...]}

Node ids, by ``feature_type``:

- ``"cross layer transcoder"`` (every feature, whatever the transcoder kind):
  ``"{layer}_{feature}_{position}"``; ``feature`` is the Cantor pairing of (layer, feature);
- ``"mlp reconstruction error"``: ``"0_{layer}_{position}"``, ``feature`` -1;
- ``"embedding"``: ``"E_{token id}_{position}"``, layer ``"E"``, ``feature`` the position;
- ``"logit"``: ``"{n_layers + 1}_{token id}_{position}"``, ``feature`` the token id.

circuit-tracer's ids can collide: feature ``f`` of layer 0 at position ``p`` and the
error node of layer ``f`` at ``p`` are both ``"0_{f}_{p}"``, and its front end keys nodes by
id, so one would silently replace the other. When that happens here the error node is
written as ``"0_{layer}_{position}_err"`` (the front end treats ids as opaque keys; readers
go by ``feature_type``). ``influence`` is the node's cumulative influence share from pruning (as
circuit-tracer writes it); links run source -> target with the raw edge weight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from tzoo.circuits.attribution import AttributionGraph, prune

SCHEMA_VERSION = 1
FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
LOGIT = "logit"
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class GraphJSONError(ValueError):
    """A graph JSON file that is not circuit-tracer's format (with what is wrong)."""


class GraphMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = SCHEMA_VERSION


class QParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class GraphNode(BaseModel):
    model_config = ConfigDict(extra="ignore")

    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str = ""
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None

    @model_validator(mode="after")
    def _js_id(self) -> GraphNode:
        if not self.jsNodeId:
            self.jsNodeId = self.node_id  # circuit-tracer's default
        return self

    def coordinates(self) -> dict[str, Any]:
        """What the node is: kind plus layer/feature/token and position, from its id."""
        parts = self.node_id.split("_")
        kinds = {FEATURE: "feature", ERROR: "error", EMBEDDING: "token", LOGIT: "logit"}
        kind = kinds.get(self.feature_type, self.feature_type)
        try:
            if kind == "feature":
                return {
                    "kind": kind,
                    "layer": int(parts[0]),
                    "feature": int(parts[1]),
                    "position": int(parts[2]),
                }
            if kind == "error":
                return {"kind": kind, "layer": int(parts[1]), "position": int(parts[2])}
            if kind in ("token", "logit"):
                return {"kind": kind, "token": int(parts[1]), "position": int(parts[2])}
        except (IndexError, ValueError):
            pass
        return {"kind": kind, "position": self.ctx_idx}


class GraphLink(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source: str
    target: str
    weight: float = Field(allow_inf_nan=False)


class GraphFile(BaseModel):
    """One graph JSON document."""

    model_config = ConfigDict(extra="ignore")

    metadata: GraphMetadata
    qParams: QParams
    nodes: list[GraphNode]
    links: list[GraphLink]

    @model_validator(mode="after")
    def _consistent(self) -> GraphFile:
        ids = [node.node_id for node in self.nodes]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"node ids appear twice: {', '.join(twice[:5])}")
        known = set(ids)
        for link in self.links:
            for end in (link.source, link.target):
                if end not in known:
                    raise ValueError(f"a link names node {end!r}, which is not in nodes")
        return self

    def node(self, node_id: str) -> GraphNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"No node {node_id!r} in graph {self.metadata.slug!r}.")

    def adjacency(self) -> tuple[list[str], Tensor]:
        """Node ids in file order and the (n, n) dense adjacency [target, source]."""
        ids = [node.node_id for node in self.nodes]
        index = {node_id: i for i, node_id in enumerate(ids)}
        matrix = torch.zeros(len(ids), len(ids))
        for link in self.links:
            matrix[index[link.target], index[link.source]] = link.weight
        return ids, matrix


# -- writing ----------------------------------------------------------------------------------


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def graph_nodes(
    graph: AttributionGraph,
    node_mask: Tensor,
    cumulative_scores: Tensor,
    clerps: Mapping[tuple[int, int], str] | None = None,
) -> dict[int, GraphNode]:
    """The kept nodes, by node index, as the file writes them; ``clerps`` labels features
    by (layer, feature)."""
    nodes: dict[int, GraphNode] = {}
    kept = node_mask.nonzero().squeeze(1).tolist()
    feature_ids = set()
    for index in kept[: int(node_mask[: graph.n_features].sum())]:
        info = graph.describe(index)
        feature_ids.add(f"{info['layer']}_{info['feature']}_{info['position']}")
    for index in kept:
        info = graph.describe(index)
        influence = float(cumulative_scores[index])
        kind, position = info["kind"], info["position"]
        if kind == "feature":
            layer, feature = info["layer"], info["feature"]
            active = graph.selected_features[index]
            nodes[index] = GraphNode(
                node_id=f"{layer}_{feature}_{position}",
                feature=_cantor(layer, feature),
                layer=str(layer),
                ctx_idx=position,
                feature_type=FEATURE,
                jsNodeId=f"{layer}_{feature}-0",
                clerp=(clerps or {}).get((layer, feature), ""),
                influence=influence,
                activation=float(graph.activation_values[active]),
            )
        elif kind == "error":
            layer = info["layer"]
            node_id = f"0_{layer}_{position}"
            nodes[index] = GraphNode(
                node_id=node_id + "_err" if node_id in feature_ids else node_id,
                feature=-1,
                layer=str(layer),
                ctx_idx=position,
                feature_type=ERROR,
                jsNodeId=f"{layer}_{position}-0",
                influence=influence,
            )
        elif kind == "token":
            token = info["token"]
            nodes[index] = GraphNode(
                node_id=f"E_{token}_{position}",
                feature=position,
                layer="E",
                ctx_idx=position,
                feature_type=EMBEDDING,
                jsNodeId=f"E_{token}-{position}",
                influence=influence,
            )
        else:
            token, k = info["token"], index - graph.logit_start
            probability = float(graph.logit_probabilities[k])
            layer = str(graph.n_layers + 1)
            nodes[index] = GraphNode(
                node_id=f"{layer}_{token}_{position}",
                feature=token,
                layer=layer,
                ctx_idx=position,
                feature_type=LOGIT,
                token_prob=probability,
                is_target_logit=k == 0,
                jsNodeId=f"L_{token}-{position}",
                clerp=f'Output "{graph.logit_strings[k]}" (p={probability:.3f})',
            )
    return nodes


def to_graph_json(
    graph: AttributionGraph,
    *,
    slug: str,
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    clerps: Mapping[tuple[int, int], str] | None = None,
) -> GraphFile:
    """``graph`` pruned at the thresholds, as circuit-tracer's graph JSON document (its
    ``create_graph_files``: kept nodes that a kept link touches, plus every token and logit
    node)."""
    _check_slug(slug)
    pruned = prune(graph, node_threshold, edge_threshold)
    nodes = graph_nodes(graph, pruned.node_mask, pruned.cumulative_scores, clerps)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix[targets, sources].tolist()
    links = [
        GraphLink(source=nodes[s].node_id, target=nodes[t].node_id, weight=w)
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in nodes and t in nodes
    ]
    linked = {link.source for link in links} | {link.target for link in links}
    used = [
        node
        for node in nodes.values()
        if node.node_id in linked or node.feature_type in (EMBEDDING, LOGIT)
    ]
    metadata = GraphMetadata(
        slug=slug,
        scan=scan or graph.scan or graph.model_name,
        transcoder_list=[],
        prompt_tokens=list(graph.token_strings),
        prompt=graph.prompt,
        node_threshold=node_threshold,
        schema_version=SCHEMA_VERSION,
    )
    q_params = QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return GraphFile(metadata=metadata, qParams=q_params, nodes=used, links=links)


def write_graph_json(
    graph: AttributionGraph,
    directory: str | Path,
    *,
    slug: str,
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    clerps: Mapping[tuple[int, int], str] | None = None,
) -> Path:
    """Write ``{slug}.json`` into ``directory`` and list it in the directory's
    ``graph-metadata.json``, as circuit-tracer's ``create_graph_files`` does (so its local
    server can open it). Returns the graph file's path."""
    document = to_graph_json(
        graph,
        slug=slug,
        scan=scan,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        clerps=clerps,
    )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug}.json"
    path.write_text(document.model_dump_json(indent=2), encoding="utf-8")
    index_path = folder / "graph-metadata.json"
    index: dict[str, Any] = {"graphs": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise GraphJSONError(f"{index_path} is not valid JSON: {error}.") from None
    graphs = [g for g in index.get("graphs", []) if g.get("slug") != slug]
    index["graphs"] = [*graphs, document.metadata.model_dump()]
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return path


def _check_slug(slug: str) -> None:
    if not _SLUG.match(slug):
        raise GraphJSONError(
            f"Slug {slug!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it names the file)."
        )


# -- reading ----------------------------------------------------------------------------------


def read_graph_json(source: str | Path | Mapping[str, Any]) -> GraphFile:
    """A graph JSON document from a file path, a JSON string or a parsed mapping;
    GraphJSONError says what is wrong with a malformed one."""
    data: Any = source
    if isinstance(source, Path) or (
        isinstance(source, str) and not source.lstrip().startswith("{")
    ):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise GraphJSONError(f"Cannot read graph file {str(path)!r}: {error}.") from None
        data = _parse(text, str(path))
    elif isinstance(source, str):
        data = _parse(source, "the text")
    if not isinstance(data, Mapping):
        raise GraphJSONError(
            "A graph JSON document is an object with metadata, qParams, "
            f"nodes and links; got {type(data).__name__}."
        )
    missing = [key for key in ("metadata", "qParams", "nodes", "links") if key not in data]
    if missing:
        raise GraphJSONError(f"Not a circuit-tracer graph: missing {', '.join(missing)}.")
    try:
        return GraphFile.model_validate(dict(data))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the document"
        raise GraphJSONError(
            f"Malformed graph JSON at {where}: {first['msg']} ({error.error_count()} "
            "problem(s) in all)."
        ) from None


def _parse(text: str, name: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise GraphJSONError(f"{name} is not valid JSON: {error}.") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")
