"""Attribution graphs as a service: which transcoders exist, compute a graph, keep it
compactly, read it back as circuit-tracer's graph JSON, keep view states, and answer the
questions the graph page asks about one feature (its dashboard, what scaling it does).

The web routes and any other front door call these functions; none of them computes
tensors or writes rows itself. The analyses live in ``tzoo.circuits``.

**Stored graph** (artefact kind ``graph``): the graph pruned at the requested thresholds.
Arrays (the store's codec, float32 unless noted), one row per kept node, in the unpruned
graph's node order (features, errors, tokens, logits), and one per kept edge, in
row-major (target, source) order, as circuit-tracer writes its links:

- ``node_index`` (N,) int32: index in the unpruned graph; ``node_kind`` (N,) uint8:
  0 feature, 1 error, 2 token, 3 logit; ``node_layer`` (N,) int32 (-1 for tokens and
  logits); ``node_position`` (N,) int32; ``node_feature`` (N,) int32: the feature index,
  or the token id of a token or logit node, -1 for errors; ``node_activation`` (N,): a
  feature's activation, a logit's probability, else 0;
- ``node_cumulative`` (N,): circuit-tracer's ``influence`` (the share of all influence
  held by the nodes at least as influential, inclusive); ``node_share`` (N,): the share
  held by the nodes strictly more influential than this one;
- ``edge_target``, ``edge_source`` (E,) int32: rows of the node table; ``edge_weight``
  (E,) float16 when every weight is a normal float16 number, else float32;
  ``edge_share`` (E,): the share of all edge scores held by strictly larger ones;
- ``token_ids`` (T,) int64; ``node_ids``: the nodes' circuit-tracer ids as
  ``graph_json`` writes them, UTF-8 lines as uint8 (so an id never changes with the
  thresholds, and the export at the stored thresholds equals ``to_graph_json``'s).

The shares make re-thresholding exact without the unpruned graph: ``prune`` keeps a node
(edge) at threshold t exactly when its share is below t (or 0: the top one), so lowering
the thresholds and repeating prune's clean-up (a feature or error node needs a kept
outgoing edge, a feature a kept incoming one) gives what ``prune`` gives on the whole
graph at those thresholds. ``refilter`` does it here; the page does the same in
JavaScript. Metadata (prompt, tokens, logit tokens and probabilities, transcoder set,
thresholds, scores, timings) sits in ``params``.

**View** (artefact kind ``graph_view``): pinned node ids, supernodes (named groups of
node ids), thresholds and the selected node of one graph, in ``params``; its slug is the
``view`` of a permalink ``/graph/{graph}?view={view}``.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sqlalchemy.orm import Session

from tzoo.analyses.attention import InputTooLongError
from tzoo.circuits import graph_json as gj
from tzoo.circuits.attribution import (
    AttributionGraph,
    PruneResult,
    attribute,
    graph_scores,
    normalized_adjacency,
    prune,
)
from tzoo.circuits.features import TranscoderMismatchError as FeaturesMismatchError
from tzoo.circuits.features import build_dashboards
from tzoo.circuits.interventions import (
    MODES,
    FeatureIntervention,
    InterventionError,
    InterventionMode,
    intervene,
)
from tzoo.circuits.io import (
    HUB_IDS,
    TranscoderFormatError,
    TranscoderMismatchError,
    TranscodersNotFoundError,
    list_saved_transcoders,
    load_transcoders,
    transcoders_root,
)
from tzoo.circuits.replacement import (
    ReplacementUnsupportedError,
    TargetPositionError,
    build_replacement,
    resolve_position,
    tokenize,
)
from tzoo.circuits.replacement import TranscoderMismatchError as ReplacementMismatchError
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.config import Settings
from tzoo.runtime.catalogue import resolve
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager
from tzoo.service.dashboards import dashboard_key, dashboard_of, store_dashboard, stored_dashboard
from tzoo.store.artefacts import create_artefact, delete_artefact, list_artefacts, load_arrays
from tzoo.store.models import Artefact

GRAPH_KIND = "graph"
VIEW_KIND = "graph_view"
GRAPH_VERSION = 1
VIEW_VERSION = 1
DASHBOARD_VERSION = 1
MAX_PROMPT_TOKENS = 256  # attribution costs a backward pass per batch of targets
MAX_FEATURE_NODES = 8192
DEFAULT_NODE_THRESHOLD = 0.8
DEFAULT_EDGE_THRESHOLD = 0.98
DEFAULT_MAX_FEATURE_NODES = 4096
MAX_PINNED = 1000
MAX_SUPERNODES = 100
MAX_INTERVENTIONS = 64
TRAIN_COMMAND = "tzoo transcoders train --model {model}"
_FINGERPRINT_TAIL = 64 * 1024  # bytes of each weight file hashed into a set's fingerprint
# How dashboards on the graph page are built (over the shipped corpus): the page shows
# a handful of contexts, so fewer and shorter ones than the library's defaults.
DASHBOARD_OPTIONS: dict[str, Any] = {
    "contexts_per_feature": 12,
    "quantiles": 4,
    "samples_per_quantile": 3,
    "window": 10,
    "n_logits": 10,
    "histogram_bins": 32,
    "max_tokens": 256,
}

NodeKind = Literal["feature", "error", "token", "logit"]
NODE_KINDS: tuple[NodeKind, ...] = ("feature", "error", "token", "logit")
FEATURE, ERROR, TOKEN, LOGIT = range(4)
_FEATURE_TYPES = (gj.FEATURE, gj.ERROR, gj.EMBEDDING, gj.LOGIT)


# -- errors -------------------------------------------------------------------------------------


class UnknownTranscodersError(LookupError):
    """No transcoder set with this id for this model (lists the ones there are)."""

    def __init__(self, message: str, known: list[str]) -> None:
        super().__init__(message)
        self.known = known


class TranscodersNotTrainedError(RuntimeError):
    """The model has no transcoders yet; the message gives the command that makes them."""

    def __init__(self, model_name: str) -> None:
        self.command = TRAIN_COMMAND.format(model=model_name)
        super().__init__(
            f"No transcoders have been trained for {model_name} yet. Train some with "
            f"`{self.command}` and try again."
        )
        self.model_name = model_name


class TranscodersChangedError(RuntimeError):
    """The transcoder set a graph was made with has been retrained or removed since."""


class GraphRequestError(ValueError):
    """A request that does not fit the graph or the model: a target position outside the
    prompt, transcoders made for another model, an intervention or a view naming nodes,
    layers or features that do not exist."""


class NoSuchFeatureError(LookupError):
    """A feature the graph's transcoder set does not have."""


# -- transcoder sets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscoderSetInfo:
    """One saved transcoder set. ``id`` is its folder relative to the transcoders root
    (``tiny-llama/plt-jumprelu-48f-L0-1``); ``model_name`` the catalogue name it is for."""

    id: str
    model_name: str
    kind: str
    activation: str
    layers: list[int]
    n_features: int | None
    tokens: int | None
    explained_variance: float | None
    next_token_agreement: float | None
    path: Path = field(repr=False)

    def fingerprint(self) -> str:
        """Changes when the set is retrained or replaced: a hash of ``config.yaml`` and,
        per weight file, its name, size, modification time and last 64 KiB (tensor data:
        a retrained set differs there even when written within one clock tick)."""
        digest = hashlib.sha256()
        config = self.path / "config.yaml"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for file in sorted(self.path.glob("*.safetensors")):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            with file.open("rb") as handle:
                handle.seek(max(0, stat.st_size - _FINGERPRINT_TAIL))
                digest.update(handle.read(_FINGERPRINT_TAIL))
        return digest.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_name": self.model_name,
            "kind": self.kind,
            "activation": self.activation,
            "layers": list(self.layers),
            "n_features": self.n_features,
            "tokens": self.tokens,
            "explained_variance": self.explained_variance,
            "next_token_agreement": self.next_token_agreement,
        }


_CATALOGUE_NAME_OF_HUB_ID = {hub: name for name, hub in HUB_IDS.items()}


def list_transcoder_sets(settings: Settings) -> dict[str, list[TranscoderSetInfo]]:
    """Every saved set under the transcoders root, by the catalogue name of its model
    (circuit-tracer sets name a hub id; a bundled model's hub id maps to its name)."""
    root = transcoders_root(settings)
    found: dict[str, list[TranscoderSetInfo]] = {}
    for saved in list_saved_transcoders(root):
        model = _CATALOGUE_NAME_OF_HUB_ID.get(saved.model_name, saved.model_name)
        info = TranscoderSetInfo(
            id=saved.path.relative_to(root).as_posix(),
            model_name=model,
            kind=saved.kind,
            activation=saved.activation,
            layers=list(saved.layers),
            n_features=saved.n_features,
            tokens=saved.tokens,
            explained_variance=saved.explained_variance,
            next_token_agreement=saved.next_token_agreement,
            path=saved.path,
        )
        found.setdefault(model, []).append(info)
    return found


def find_transcoder_set(
    settings: Settings, model_name: str, set_id: str | None
) -> TranscoderSetInfo:
    """The set ``set_id`` of ``model_name`` (None: its first, by id). Only ids that the
    listing holds are accepted, so a request never names an arbitrary folder."""
    sets = list_transcoder_sets(settings).get(model_name, [])
    if not sets:
        raise TranscodersNotTrainedError(model_name)
    if set_id is None:
        return sets[0]
    for info in sets:
        if info.id == set_id:
            return info
    known = [info.id for info in sets]
    raise UnknownTranscodersError(
        f"No transcoder set {set_id!r} for {model_name}; it has {', '.join(known)}.", known
    )


class _LoadedTranscoders:
    """The last few transcoder sets read from disk, by (folder, fingerprint, device):
    smollm2's sets are hundreds of MB, read once rather than per request."""

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], TranscoderSet] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, info: TranscoderSetInfo, handle: ModelHandle) -> TranscoderSet:
        key = (str(info.path), info.fingerprint(), str(handle.device))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            transcoders = _read_transcoders(info, handle)
            self._entries[key] = transcoders
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return transcoders

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _read_transcoders(info: TranscoderSetInfo, handle: ModelHandle) -> TranscoderSet:
    try:
        transcoders = load_transcoders(info.path, handle=handle)
    except TranscodersNotFoundError:
        raise TranscodersChangedError(
            f"The transcoder set {info.id} has gone from disk; list the sets again."
        ) from None
    except (TranscoderFormatError, TranscoderMismatchError) as error:
        raise GraphRequestError(f"Transcoder set {info.id}: {error}") from None
    return transcoders.to(handle.device)


LOADED_TRANSCODERS = _LoadedTranscoders()


# -- computing and storing a graph ----------------------------------------------------------------


@dataclass(frozen=True)
class GraphRequest:
    model_name: str
    transcoders: str | None
    prompt: str
    target_position: int | None = None  # None: the last token, or an encoder's mask
    node_threshold: float = DEFAULT_NODE_THRESHOLD
    edge_threshold: float = DEFAULT_EDGE_THRESHOLD
    max_feature_nodes: int = DEFAULT_MAX_FEATURE_NODES
    max_prompt_tokens: int = MAX_PROMPT_TOKENS


@dataclass(frozen=True)
class GraphRecord:
    """What is stored: ``params`` (JSON) and ``arrays`` (see the module docstring)."""

    model_name: str
    prompt: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray]


def canonical_model_name(settings: Settings, model_name: str) -> str:
    """The catalogue name of ``model_name``; UnknownModelError when there is none."""
    return resolve(model_name, hub_offline=settings.hub_offline).name


def check_traceable(settings: Settings, model_name: str) -> str:
    """The catalogue name of ``model_name`` (UnknownModelError when there is none), refusing
    encoder-decoders before anything loads (an encoder without a head is refused once
    loaded, by ``linear_parts``)."""
    spec = resolve(model_name, hub_offline=settings.hub_offline)
    if spec.architecture == "encoder-decoder":
        raise ReplacementUnsupportedError(
            f"Attribution graphs need a decoder-only model or an encoder with a masked-LM "
            f"head; {spec.name!r} is an encoder-decoder, whose decoder reads the encoder "
            "through cross-attention, a second stream the replacement model does not trace."
        )
    return spec.name


def compute_graph(manager: ModelManager, settings: Settings, request: GraphRequest) -> GraphRecord:
    """Attribute ``request.prompt`` with the chosen transcoders, prune it, and encode it.

    Holds the model exclusively meanwhile (attribution installs hooks). Raises
    UnknownModelError, ReplacementUnsupportedError (encoder-decoders, encoders without a
    head), TranscodersNotTrainedError,
    UnknownTranscodersError, EmptyInputError, InputTooLongError and GraphRequestError."""
    for name, value in (
        ("node_threshold", request.node_threshold),
        ("edge_threshold", request.edge_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise GraphRequestError(f"{name} must lie in 0..1; got {value}.")
    model_name = check_traceable(settings, request.model_name)
    info = find_transcoder_set(settings, model_name, request.transcoders)
    with manager.use(model_name, exclusive=True) as handle:
        transcoders = LOADED_TRANSCODERS.get(info, handle)
        n_tokens = int(tokenize(handle, request.prompt).numel())
        if n_tokens > request.max_prompt_tokens:
            raise InputTooLongError(n_tokens, request.max_prompt_tokens, "the graph prompt limit")
        try:
            if request.target_position is not None:
                resolve_position(request.target_position, n_tokens)
            graph = attribute(
                handle,
                transcoders,
                request.prompt,
                target_position=request.target_position,
                max_feature_nodes=request.max_feature_nodes,
            )
        except (TargetPositionError, ReplacementMismatchError) as error:
            raise GraphRequestError(str(error)) from None
    return encode_graph(
        graph,
        info,
        transcoders.config,
        node_threshold=request.node_threshold,
        edge_threshold=request.edge_threshold,
        max_feature_nodes=request.max_feature_nodes,
    )


def encode_graph(
    graph: AttributionGraph,
    info: TranscoderSetInfo,
    config: TranscoderConfig,
    *,
    node_threshold: float,
    edge_threshold: float,
    max_feature_nodes: int | None,
) -> GraphRecord:
    """``graph`` pruned at the thresholds as a record to store (module docstring)."""
    pruned = prune(graph, node_threshold, edge_threshold)
    weights = graph.logit_weights()
    edge_scores = normalized_adjacency(graph.adjacency_matrix.float()) * (
        pruned.node_influence + weights
    ).unsqueeze(1)
    node_mask, edge_mask = pruned.node_mask.clone(), pruned.edge_mask
    targets, sources = edge_mask.nonzero(as_tuple=True)
    # circuit-tracer's files list the kept nodes a kept link touches, and every token and
    # logit node (prune's clean-up already leaves no other).
    linked = torch.zeros_like(node_mask)
    linked[targets] = True
    linked[sources] = True
    linked[graph.token_start :] = True
    node_mask &= linked
    kept = node_mask.nonzero().squeeze(1)
    row_of = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    row_of[kept] = torch.arange(len(kept))

    table = _node_table(graph, kept)
    scores = graph_scores(graph)
    edge_weight = graph.adjacency_matrix[targets, sources].float().numpy()
    arrays: dict[str, np.ndarray] = {
        **table,
        "node_cumulative": pruned.cumulative_scores[kept].float().cpu().numpy(),
        "node_share": _shares(pruned.node_influence, pruned.node_influence[kept]),
        "edge_target": row_of[targets].to(torch.int32).numpy(),
        "edge_source": row_of[sources].to(torch.int32).numpy(),
        "edge_weight": _compact(edge_weight),
        "edge_share": _shares(edge_scores, edge_scores[targets, sources]),
        "token_ids": graph.input_tokens.to(torch.int64).cpu().numpy(),
        "node_ids": _encoded_ids(graph, pruned, kept),
    }
    params: dict[str, Any] = {
        "version": GRAPH_VERSION,
        "prompt": graph.prompt,
        "prompt_tokens": list(graph.token_strings),
        "n_tokens": graph.n_tokens,
        "n_layers": graph.n_layers,
        "target_position": graph.target_position,
        "transcoders": {
            "id": info.id,
            "kind": graph.transcoder_kind,
            "activation": config.activation,
            "layers": list(graph.transcoder_layers),
            "n_features": config.n_features,
            "fingerprint": info.fingerprint(),
        },
        "scan": graph.scan or graph.model_name,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "max_feature_nodes": max_feature_nodes,
        "bos_excluded": graph.bos_excluded,
        "logit_tokens": [int(t) for t in graph.logit_tokens.tolist()],
        "logit_strings": list(graph.logit_strings),
        "logit_probabilities": [float(p) for p in graph.logit_probabilities.tolist()],
        "scores": {
            "replacement": _finite(scores.replacement),
            "completeness": _finite(scores.completeness),
        },
        "stats": {k: _finite(v) for k, v in graph.stats.items()},
        "n_active_features": int(graph.active_features.shape[0]),
        "n_feature_nodes": graph.n_features,
        "n_nodes": len(kept),
        "n_edges": len(targets),
    }
    return GraphRecord(graph.model_name, graph.prompt, params, arrays)


def _node_table(graph: AttributionGraph, kept: torch.Tensor) -> dict[str, np.ndarray]:
    n = len(kept)
    kind = np.zeros(n, dtype=np.uint8)
    layer = np.full(n, -1, dtype=np.int32)
    position = np.zeros(n, dtype=np.int32)
    feature = np.full(n, -1, dtype=np.int32)
    activation = np.zeros(n, dtype=np.float32)
    for row, index in enumerate(kept.tolist()):
        info = graph.describe(index)
        position[row] = info["position"]
        if info["kind"] == "feature":
            kind[row] = FEATURE
            layer[row], feature[row] = info["layer"], info["feature"]
            activation[row] = float(graph.activation_values[graph.selected_features[index]])
        elif info["kind"] == "error":
            kind[row] = ERROR
            layer[row] = info["layer"]
        elif info["kind"] == "token":
            kind[row] = TOKEN
            feature[row] = info["token"]
        else:
            kind[row] = LOGIT
            feature[row] = info["token"]
            activation[row] = float(graph.logit_probabilities[index - graph.logit_start])
    return {
        "node_index": kept.to(torch.int32).numpy(),
        "node_kind": kind,
        "node_layer": layer,
        "node_position": position,
        "node_feature": feature,
        "node_activation": activation,
    }


def _shares(scores: torch.Tensor, chosen: torch.Tensor) -> np.ndarray:
    """For each score in ``chosen``, the share of ``scores``' total held by the scores
    strictly larger (0 for the largest), computed as ``prune`` ranks them: kept at
    threshold t exactly when the share is below t or 0. Inf when the total is 0 (prune
    then keeps nothing)."""
    ordered = scores.flatten().float().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return np.full(len(chosen), np.inf, dtype=np.float32)
    cumulative = ordered.cumsum(0) / total
    ascending = ordered.flip(0)
    larger = len(ordered) - torch.searchsorted(ascending, chosen.float().contiguous(), right=True)
    shares = torch.where(larger > 0, cumulative[(larger - 1).clamp(min=0)], 0.0)
    return shares.cpu().numpy().astype(np.float32)


_FLOAT16_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-5
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _compact(weights: np.ndarray) -> np.ndarray:
    """float16 when every nonzero weight is a normal float16 number (relative error below
    5e-4), else float32: subnormal or overflowing weights would lose more."""
    magnitude = np.abs(weights[weights != 0])
    if magnitude.size and (magnitude.min() < _FLOAT16_NORMAL or magnitude.max() > _FLOAT16_MAX):
        return weights.astype(np.float32)
    return weights.astype(np.float16)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def create_graph(
    session: Session,
    manager: ModelManager,
    settings: Settings,
    request: GraphRequest,
    *,
    owner: str | None = None,
    visibility: str = "public",
) -> Artefact:
    """Compute the graph of ``request`` and keep it at a new permanent slug."""
    record = compute_graph(manager, settings, request)
    return store_graph(session, record, owner=owner, visibility=visibility)


def store_graph(
    session: Session, record: GraphRecord, *, owner: str | None = None, visibility: str = "public"
) -> Artefact:
    return create_artefact(
        session,
        kind=GRAPH_KIND,
        model_name=record.model_name,
        input_text=record.prompt,
        params=record.params,
        arrays=record.arrays,
        precision="float32",  # edge weights arrive float16 already (the codec never widens)
        owner=owner,
        visibility=visibility,
    )


def delete_graph(session: Session, artefact: Artefact) -> None:
    """Delete a graph and the views saved of it."""
    for view in graph_views(session, artefact):
        session.delete(view)
    session.commit()
    delete_artefact(session, artefact.slug)


def graph_views(session: Session, artefact: Artefact) -> list[Artefact]:
    """Views saved of ``artefact`` (their input text is the graph's slug)."""
    found: list[Artefact] = []
    offset = 0
    while True:
        rows = list_artefacts(
            session,
            kind=VIEW_KIND,
            visibility=None,
            text_contains=artefact.slug,
            limit=500,
            offset=offset,
        )
        found += [row for row in rows if (row.params or {}).get("graph") == artefact.slug]
        if len(rows) < 500:
            return found
        offset += 500


# -- reading a graph back -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredGraph:
    """A stored graph decoded: its params and arrays (see the module docstring)."""

    slug: str
    model_name: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, artefact: Artefact) -> StoredGraph:
        version = (artefact.params or {}).get("version")
        if artefact.kind != GRAPH_KIND or version != GRAPH_VERSION:
            raise LookupError(
                f"{artefact.slug} is not an attribution graph this tzoo reads "
                f"(kind {artefact.kind!r}, version {version!r})."
            )
        return cls(artefact.slug, artefact.model_name, artefact.params, load_arrays(artefact))

    @property
    def n_nodes(self) -> int:
        return int(self.arrays["node_kind"].shape[0])

    def node_ids(self) -> list[str]:
        """circuit-tracer's id of each stored node, as ``graph_json`` wrote it when the
        graph was stored (``node_ids`` array: UTF-8, one id a line)."""
        return bytes(self.arrays["node_ids"]).decode("utf-8").split("\n")


def _encoded_ids(graph: AttributionGraph, pruned: PruneResult, kept: torch.Tensor) -> np.ndarray:
    """The stored nodes' ids, taken from ``graph_json.graph_nodes`` so they are exactly the
    ones ``to_graph_json`` writes at the stored thresholds (including how it tells apart a
    layer-0 feature and an error node that circuit-tracer's scheme would give one id), as
    a uint8 array of UTF-8 lines. Kept with the graph, ids never change with thresholds:
    pins and views can rely on them."""
    written = gj.graph_nodes(graph, pruned.node_mask, pruned.cumulative_scores)
    ids = [written[index].node_id for index in kept.tolist()]
    if len(set(ids)) != len(ids) or any("\n" in i for i in ids):
        raise RuntimeError(f"graph_json wrote ids that are not unique lines: {ids}")
    return np.frombuffer("\n".join(ids).encode("utf-8"), dtype=np.uint8).copy()


def refilter(
    graph: StoredGraph, node_threshold: float, edge_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(node mask (N,), edge mask (E,)) of what ``prune`` keeps at lower thresholds (at or
    above the stored ones: everything stored). The page's JavaScript does the same."""
    a = graph.arrays
    kind = a["node_kind"]
    node_t, edge_t = np.float32(node_threshold), np.float32(edge_threshold)
    node_share, edge_share = a["node_share"], a["edge_share"]
    nodes = (kind >= TOKEN) | (node_share < node_t) | (node_share == 0)
    edges = (edge_share < edge_t) | (edge_share == 0)
    source, target = a["edge_source"].astype(np.int64), a["edge_target"].astype(np.int64)
    internal = kind <= ERROR
    features = kind == FEATURE
    while True:
        edges &= nodes[source] & nodes[target]
        has_out = np.zeros_like(nodes)
        has_out[source[edges]] = True
        has_in = np.zeros_like(nodes)
        has_in[target[edges]] = True
        before = nodes.copy()
        nodes &= ~internal | has_out
        nodes &= ~features | has_in
        if np.array_equal(before, nodes):
            return nodes, edges


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_dicts(graph: StoredGraph, *, extras: bool) -> list[dict[str, Any]]:
    """Every stored node as circuit-tracer's graph JSON writes it; with ``extras`` also a
    ``tzoo`` object the page reads (kind, layer, position, feature or token, share)."""
    a, p = graph.arrays, graph.params
    logit_rank = 0
    nodes = []
    top_layer = str(p["n_layers"] + 1)
    ids = graph.node_ids()
    for row in range(graph.n_nodes):
        kind, layer = int(a["node_kind"][row]), int(a["node_layer"][row])
        position, feature = int(a["node_position"][row]), int(a["node_feature"][row])
        influence: float | None = float(a["node_cumulative"][row])
        activation: float | None = None
        token_prob, clerp, is_target = 0.0, "", False
        node_id = ids[row]
        if kind == FEATURE:
            ct_feature, ct_layer, js_id = (
                _cantor(layer, feature),
                str(layer),
                f"{layer}_{feature}-0",
            )
            activation = float(a["node_activation"][row])
        elif kind == ERROR:
            ct_feature, ct_layer, js_id = -1, str(layer), f"{layer}_{position}-0"
        elif kind == TOKEN:
            ct_feature, ct_layer, js_id = position, "E", f"E_{feature}-{position}"
        else:
            ct_feature, ct_layer, js_id = feature, top_layer, f"L_{feature}-{position}"
            token_prob = float(a["node_activation"][row])
            is_target = logit_rank == 0
            clerp = f'Output "{p["logit_strings"][logit_rank]}" (p={token_prob:.3f})'
            influence = None
            logit_rank += 1
        node: dict[str, Any] = {
            "node_id": node_id,
            "feature": ct_feature,
            "layer": ct_layer,
            "ctx_idx": position,
            "feature_type": _FEATURE_TYPES[kind],
            "token_prob": token_prob,
            "is_target_logit": is_target,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": js_id,
            "clerp": clerp,
            "influence": influence,
            "activation": activation,
        }
        if extras:
            node["tzoo"] = {
                "kind": NODE_KINDS[kind],
                "layer": layer if kind <= ERROR else None,
                "position": position,
                "feature": feature if kind == FEATURE else None,
                "token": feature if kind >= TOKEN else None,
                "share": _json_share(a["node_share"][row]),
            }
        nodes.append(node)
    return nodes


def _json_share(value: np.floating[Any]) -> float:
    """Shares for JSON: Inf (nothing kept) as 2.0, above any threshold."""
    return float(value) if np.isfinite(value) else 2.0


@dataclass(frozen=True)
class Supernode:
    name: str
    nodes: list[str]


@dataclass(frozen=True)
class GraphView:
    """What the page shows of a graph, as a permalink keeps it."""

    pinned: list[str]
    supernodes: list[Supernode]
    node_threshold: float
    edge_threshold: float
    selected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pinned": list(self.pinned),
            "supernodes": [{"name": s.name, "nodes": list(s.nodes)} for s in self.supernodes],
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "selected": self.selected,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphView:
        return cls(
            pinned=[str(n) for n in data.get("pinned", [])],
            supernodes=[
                Supernode(str(s["name"]), [str(n) for n in s["nodes"]])
                for s in data.get("supernodes", [])
            ],
            node_threshold=float(data["node_threshold"]),
            edge_threshold=float(data["edge_threshold"]),
            selected=None if data.get("selected") is None else str(data["selected"]),
        )

    def q_params(self) -> dict[str, Any]:
        """circuit-tracer's ``qParams``: a supernode is its name followed by its node ids."""
        return {
            "pinnedIds": list(self.pinned),
            "supernodes": [[s.name, *s.nodes] for s in self.supernodes],
            "linkType": "both",
            "clickedId": self.selected or "",
            "sg_pos": "",
        }


def default_view(graph: StoredGraph) -> GraphView:
    return GraphView(
        [], [], float(graph.params["node_threshold"]), float(graph.params["edge_threshold"])
    )


def graph_document(
    graph: StoredGraph,
    *,
    view: GraphView | None = None,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    extras: bool = False,
) -> dict[str, Any]:
    """The graph as circuit-tracer's graph JSON (``metadata``, ``qParams``, ``nodes``,
    ``links``), at the view's thresholds (or the ones given, or the stored ones) and with
    the view's pins, supernodes and selection as ``qParams``.

    ``extras``: every node and link, whatever the thresholds, with what the page needs to
    re-threshold them itself (a ``tzoo`` object per node, ``share`` per link)."""
    view = view or default_view(graph)
    node_t = view.node_threshold if node_threshold is None else node_threshold
    edge_t = view.edge_threshold if edge_threshold is None else edge_threshold
    for name, value in (("node_threshold", node_t), ("edge_threshold", edge_t)):
        if not 0.0 <= value <= 1.0:
            raise GraphRequestError(f"{name} must lie in 0..1; got {value}.")
    a, p = graph.arrays, graph.params
    nodes = node_dicts(graph, extras=extras)
    if extras:
        node_keep = np.ones(graph.n_nodes, dtype=bool)
        edge_keep = np.ones(len(a["edge_weight"]), dtype=bool)
    else:
        node_keep, edge_keep = refilter(graph, node_t, edge_t)
    ids = [node["node_id"] for node in nodes]
    weights = a["edge_weight"].astype(np.float32).tolist()
    links = []
    for e in np.flatnonzero(edge_keep).tolist():
        link: dict[str, Any] = {
            "source": ids[int(a["edge_source"][e])],
            "target": ids[int(a["edge_target"][e])],
            "weight": weights[e],
        }
        if extras:
            link["share"] = _json_share(a["edge_share"][e])
        links.append(link)
    metadata = {
        "slug": graph.slug,
        "scan": p["scan"],
        "transcoder_list": [p["transcoders"]["id"]],
        "prompt_tokens": list(p["prompt_tokens"]),
        "prompt": p["prompt"],
        "node_threshold": node_t,
        "schema_version": gj.SCHEMA_VERSION,
    }
    return {
        "metadata": metadata,
        "qParams": view.q_params(),
        "nodes": [node for node, keep in zip(nodes, node_keep.tolist(), strict=True) if keep],
        "links": links,
    }


def graph_info(graph: StoredGraph) -> dict[str, Any]:
    """What the page shows about a graph besides its nodes and links."""
    p = graph.params
    return {
        "slug": graph.slug,
        "model_name": graph.model_name,
        "prompt": p["prompt"],
        "prompt_tokens": p["prompt_tokens"],
        "n_tokens": p["n_tokens"],
        "n_layers": p["n_layers"],
        "target_position": p["target_position"],
        "transcoders": {k: v for k, v in p["transcoders"].items() if k != "fingerprint"},
        "node_threshold": p["node_threshold"],
        "edge_threshold": p["edge_threshold"],
        "max_feature_nodes": p["max_feature_nodes"],
        "logit_tokens": p["logit_tokens"],
        "logit_strings": p["logit_strings"],
        "logit_probabilities": p["logit_probabilities"],
        "scores": p["scores"],
        "stats": p["stats"],
        "n_active_features": p["n_active_features"],
        "n_feature_nodes": p["n_feature_nodes"],
        "n_nodes": p["n_nodes"],
        "n_edges": p["n_edges"],
    }


# -- views --------------------------------------------------------------------------------------


def check_view(graph: StoredGraph, view: GraphView) -> GraphView:
    """``view`` if every node it names is in ``graph`` and its numbers are in range, else
    GraphRequestError saying what is not."""
    known = set(graph.node_ids())
    for name, value in (
        ("node_threshold", view.node_threshold),
        ("edge_threshold", view.edge_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise GraphRequestError(f"{name} must lie in 0..1; got {value}.")
    if len(view.pinned) > MAX_PINNED or len(view.supernodes) > MAX_SUPERNODES:
        raise GraphRequestError(
            f"A view holds at most {MAX_PINNED} pinned nodes and {MAX_SUPERNODES} supernodes."
        )
    named = [*view.pinned, *(n for s in view.supernodes for n in s.nodes)]
    if view.selected is not None:
        named.append(view.selected)
    unknown = sorted({n for n in named if n not in known})
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5])
        raise GraphRequestError(f"These nodes are not in graph {graph.slug}: {shown}.")
    for supernode in view.supernodes:
        if not supernode.name.strip():
            raise GraphRequestError("A supernode needs a name.")
        if not supernode.nodes:
            raise GraphRequestError(f"Supernode {supernode.name!r} has no nodes.")
    return view


def create_view(
    session: Session, artefact: Artefact, view: GraphView, *, owner: str | None = None
) -> Artefact:
    """Keep ``view`` of the graph ``artefact`` at a new slug. A view is as visible as its
    graph, but never listed (unlisted, or private with a private graph)."""
    graph = StoredGraph.of(artefact)
    check_view(graph, view)
    return create_artefact(
        session,
        kind=VIEW_KIND,
        model_name=artefact.model_name,
        input_text=artefact.slug,
        params={"version": VIEW_VERSION, "graph": artefact.slug, "view": view.to_dict()},
        arrays={},
        owner=owner,
        visibility="private" if artefact.visibility == "private" else "unlisted",
    )


def view_of(artefact: Artefact, graph_slug: str) -> GraphView:
    """The view stored in ``artefact``; LookupError unless it is a view of ``graph_slug``."""
    params = artefact.params or {}
    if artefact.kind != VIEW_KIND or params.get("graph") != graph_slug:
        raise LookupError(f"No saved view {artefact.slug!r} of graph {graph_slug!r}.")
    return GraphView.from_dict(params["view"])


# -- features of a graph: dashboards and interventions ---------------------------------------------


def _graph_transcoders(
    settings: Settings, graph: StoredGraph
) -> tuple[TranscoderSetInfo, dict[str, Any]]:
    """The transcoder set the graph was made with, as long as it has not changed."""
    used = graph.params["transcoders"]
    try:
        info = find_transcoder_set(settings, graph.model_name, used["id"])
    except (TranscodersNotTrainedError, UnknownTranscodersError):
        raise TranscodersChangedError(
            f"The transcoder set {used['id']} this graph was made with is gone; compute the "
            "graph again with a set that exists."
        ) from None
    if info.fingerprint() != used["fingerprint"]:
        raise TranscodersChangedError(
            f"The transcoder set {used['id']} was retrained after this graph was made, so its "
            "features are not the graph's any more; compute the graph again."
        )
    return info, used


def check_feature(graph: StoredGraph, layer: int, feature: int) -> None:
    used = graph.params["transcoders"]
    if layer not in used["layers"]:
        raise NoSuchFeatureError(
            f"No transcoder at layer {layer}; this graph's cover layers {used['layers']}."
        )
    n_features = int(used["n_features"])
    if not 0 <= feature < n_features:
        raise NoSuchFeatureError(
            f"Feature {feature} does not exist; layers have features 0 to {n_features - 1}."
        )


def feature_dashboard(
    manager: ModelManager,
    session: Session,
    settings: Settings,
    graph: StoredGraph,
    layer: int,
    feature: int,
    *,
    texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The dashboard of feature ``feature`` of ``layer`` over ``texts`` (default the
    shipped corpus), built with ``DASHBOARD_OPTIONS`` once and stored as an artefact (once
    per feature, set and corpus; see ``service.dashboards``), with its ``slug``."""
    from tzoo.analyses.corpus import shipped_corpus

    check_feature(graph, layer, feature)
    info, used = _graph_transcoders(settings, graph)
    corpus = list(texts) if texts is not None else shipped_corpus()
    source = {
        "transcoders": used["id"],
        "fingerprint": used["fingerprint"],
        "corpus": "shipped" if texts is None else "given",
        "corpus_sha256": hashlib.sha256("\x00".join(corpus).encode()).hexdigest(),
    }
    what = {
        "model": graph.model_name,
        "layer": layer,
        "feature": feature,
        "options": DASHBOARD_OPTIONS,
        "version": DASHBOARD_VERSION,
        **source,
    }
    key = dashboard_key(**what)
    stored = stored_dashboard(session, key)
    if stored is not None:
        return dashboard_of(stored)
    with manager.use(graph.model_name, exclusive=True) as handle:
        transcoders = LOADED_TRANSCODERS.get(info, handle)
        try:
            dashboards = build_dashboards(
                handle, transcoders, corpus, features={layer: [feature]}, **DASHBOARD_OPTIONS
            )
        except FeaturesMismatchError as error:
            raise GraphRequestError(str(error)) from None
    result = dashboards[(layer, feature)].to_dict()
    return dashboard_of(store_dashboard(session, key, result, source))


@dataclass(frozen=True)
class InterventionSpec:
    """Scale feature ``feature`` of ``layer`` at ``position`` by ``scale``, or set it to
    ``value`` (exactly one)."""

    layer: int
    position: int
    feature: int
    scale: float | None = None
    value: float | None = None

    def feature_intervention(self) -> FeatureIntervention:
        if (self.scale is None) == (self.value is None):
            raise GraphRequestError("Give each intervention either a scale or a value.")
        return FeatureIntervention(
            self.layer, self.position, self.feature, value=self.value, factor=self.scale
        )


def run_interventions(
    manager: ModelManager,
    settings: Settings,
    graph: StoredGraph,
    specs: Sequence[InterventionSpec],
    *,
    mode: InterventionMode = "frozen",
    top_k: int = 10,
) -> dict[str, Any]:
    """Apply ``specs`` to the graph's prompt (``interventions.intervene`` in ``mode``)
    and read the logits at the graph's target position, before and after: the top
    ``top_k`` tokens of each, and the graph's logit tokens."""
    if not specs:
        raise GraphRequestError("Give at least one intervention.")
    if len(specs) > MAX_INTERVENTIONS:
        raise GraphRequestError(f"At most {MAX_INTERVENTIONS} interventions at once.")
    if mode not in MODES:
        raise GraphRequestError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    for spec in specs:
        check_feature(graph, spec.layer, spec.feature)
    changes = [spec.feature_intervention() for spec in specs]
    info, _ = _graph_transcoders(settings, graph)
    ids = [int(i) for i in graph.arrays["token_ids"].tolist()]
    position = int(graph.params["target_position"])
    with manager.use(graph.model_name, exclusive=True) as handle:
        transcoders = LOADED_TRANSCODERS.get(info, handle)
        try:
            replacement = build_replacement(handle, transcoders, ids)
            result = intervene(replacement, changes, mode=mode, position=position, top_k=top_k)
        except (InterventionError, ReplacementMismatchError) as error:
            raise GraphRequestError(str(error)) from None
    before, after = result.logits_before[position], result.logits_after[position]
    p_before, p_after = torch.softmax(before, -1), torch.softmax(after, -1)
    tracked = [
        {
            "token_id": token,
            "token": text,
            "logit_before": float(before[token]),
            "logit_after": float(after[token]),
            "probability_before": float(p_before[token]),
            "probability_after": float(p_after[token]),
        }
        for token, text in zip(
            graph.params["logit_tokens"], graph.params["logit_strings"], strict=True
        )
    ]
    return {
        "mode": result.mode,
        "position": result.position,
        "interventions": [
            {
                "layer": c.layer,
                "position": c.position,
                "feature": c.feature,
                "value": c.value,
                "scale": c.factor,
            }
            for c in result.interventions
        ],
        "top_before": [_token(t) for t in result.top_before],
        "top_after": [_token(t) for t in result.top_after],
        "graph_logits": tracked,
    }


def _token(t: Any) -> dict[str, Any]:
    return {
        "token_id": t.token_id,
        "token": t.token,
        "probability": t.probability,
        "logit": t.logit,
    }
