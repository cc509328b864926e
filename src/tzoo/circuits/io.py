"""Transcoders on disk in circuit-tracer's format, so each tool reads the other's.

What is matched, and where it comes from (circuit-tracer 0.5.0 as published on PyPI, files
``circuit_tracer/transcoder/single_layer_transcoder.py``, ``cross_layer_transcoder.py``,
``utils/caching.py`` and ``utils/hf_utils.py``; the same layout is on the repository's main
branch):

- A directory holding ``config.yaml`` and safetensors files. ``config.yaml`` keys read by
  circuit-tracer: ``model_kind`` (``transcoder_set`` or ``cross_layer_transcoder``),
  ``model_name`` (the model to load, a hub id), ``feature_input_hook`` and
  ``feature_output_hook`` (hook names), optionally ``transcoders`` (a list of file paths, the
  i-th for layer i) and ``scan``; other keys are ignored, so ours go under ``tzoo:``. Such
  a directory is what circuit-tracer's cache holds (``load_transcoders_from_cache(ref,
  cache_dir=...)`` reads ``cache_dir/ref/config.yaml``).
- Per-layer transcoders (``model_kind: transcoder_set``): one ``layer_{i}.safetensors`` per
  model layer i with ``W_enc`` (d_transcoder, d_model) (their encoder runs
  ``F.linear(x, W_enc, b_enc)``), ``W_dec`` (d_transcoder, d_model), ``b_enc``
  (d_transcoder,), ``b_dec`` (d_model,), for JumpReLU ``activation_function.threshold``
  (d_transcoder,) (the key of their ``to_safetensors``; without it they apply a ReLU) and
  for a skip transcoder ``W_skip`` (d_model, d_model) applied as ``x @ W_skip.T``.
- Cross-layer transcoders (``model_kind: cross_layer_transcoder``): per layer i,
  ``W_enc_{i}.safetensors`` holding ``W_enc_{i}`` (d_transcoder, d_model), ``b_enc_{i}``,
  ``b_dec_{i}`` (the bias of layer i's output) and for JumpReLU ``threshold_{i}``
  (d_transcoder,); and ``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` (d_transcoder,
  n_layers - i, d_model): layer i's features writing to layers i, i + 1, ...
- Hooks: we write ``mlp.hook_in`` and ``mlp.hook_out`` (what the MLP reads and returns;
  circuit-tracer wraps every MLP with these two hooks, and its llama mapping sends them to
  ``post_attention_layernorm``'s output and ``mlp``'s output: exactly our ``mlp_in`` and
  ``mlp_out``). On reading, ``ln2.hook_normalized`` and ``hook_mlp_out`` are accepted too.
- dtype: we write float32 (circuit-tracer casts to the dtype it is asked for on loading).
- Weights are stored with the input and output scales folded in (``TranscoderSet.folded``);
  a loaded set has scales 1.

Where circuit-tracer is narrower than tzoo: it loads a per-layer set only when the layers
are 0..n-1 with none missing, and a cross-layer transcoder only when it starts at layer 0
(it counts the ``W_enc_*`` files); TopK sets are written with ``activation: topk`` and ``k``
(the keys its main branch reads), which 0.5.0 ignores, reading them as ReLU. tzoo reads
every set it writes.

Also read: the older layout of circuit-tracer's hub transcoders, whose ``W_dec`` is
(d_model, d_transcoder), and the older ``config.yaml`` whose ``transcoders`` list holds
``{id, layer, filepath}`` entries. Files on the hub (``hf://``) are not fetched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tzoo.circuits.transcoders import (
    HUB_IDS,
    TranscoderConfig,
    TranscoderConfigError,
    TranscoderMismatchError,
    TranscoderSet,
)
from tzoo.config import Settings, get_settings
from tzoo.runtime.handle import ModelHandle

Tensor = torch.Tensor
CONFIG_FILE = "config.yaml"
FORMAT = "tzoo-transcoders"
FORMAT_VERSION = 1
INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOK = "mlp.hook_out"
THRESHOLD_KEY = "activation_function.threshold"
# circuit-tracer hook names -> our sites
_INPUT_HOOKS = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in"}
_OUTPUT_HOOKS = {"mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out"}
# Hub ids of bundled models, written as ``model_name`` so circuit-tracer can load the model.
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_ENCODER_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")
_WEIGHT_FILE = re.compile(r"^(layer|W_enc|W_dec)_\d+\.safetensors$")


class TranscodersNotFoundError(FileNotFoundError):
    """No transcoders where some were looked for."""


class TranscoderFormatError(ValueError):
    """Files that are not transcoders in circuit-tracer's format (or ours), with why."""


# -- where they live --------------------------------------------------------------------------


def transcoders_root(settings: Settings | None = None) -> Path:
    """TZOO_TRANSCODERS_DIR, by default ``TZOO_CACHE_DIR/transcoders``."""
    settings = settings or get_settings()
    return settings.transcoders_dir or settings.cache_dir / "transcoders"


def run_name(config: TranscoderConfig) -> str:
    """A directory name that tells a set apart: ``plt-jumprelu-2048f-L0-3``."""
    return f"{config.kind}-{config.activation}-{config.n_features}f-L{_layer_span(config.layers)}"


def default_transcoders_dir(config: TranscoderConfig, settings: Settings | None = None) -> Path:
    """Where ``tzoo transcoders train`` saves ``config``'s set: the root, the model's name,
    then ``run_name(config)``."""
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", config.model_name).strip("._") or "model"
    return transcoders_root(settings) / safe_model / run_name(config)


def _layer_span(layers: tuple[int, ...]) -> str:
    """``(0, 1, 2, 3, 7)`` -> ``0-3_7``."""
    parts: list[str] = []
    start = previous = layers[0]
    for layer in (*layers[1:], None):
        if layer is not None and layer == previous + 1:
            previous = layer
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if layer is not None:
            start = previous = layer
    return "_".join(parts)


# -- saving -----------------------------------------------------------------------------------


def save_transcoders(transcoders: TranscoderSet, directory: Path | str) -> Path:
    """Write ``transcoders`` into ``directory`` (created if needed) in circuit-tracer's
    format; weight files of an earlier set there are removed, ``config.yaml`` is written
    last. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = transcoders.config
    files = _clt_files(transcoders) if config.kind == "clt" else _layer_files(transcoders)
    for name, tensors in files.items():
        contiguous = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(directory / name))
    for stale in directory.iterdir():
        if _WEIGHT_FILE.match(stale.name) and stale.name not in files:
            stale.unlink()
    partial = directory / (CONFIG_FILE + ".partial")
    partial.write_text(yaml.safe_dump(_yaml_config(config), sort_keys=False), encoding="utf-8")
    os.replace(partial, directory / CONFIG_FILE)
    return directory


def _layer_files(transcoders: TranscoderSet) -> dict[str, dict[str, Tensor]]:
    files = {}
    for layer in transcoders.layers:
        folded = transcoders.folded(layer)
        tensors = {
            "W_enc": folded.W_enc.T,  # ours (d, F) -> theirs (F, d)
            "W_dec": folded.W_dec,
            "b_enc": folded.b_enc,
            "b_dec": folded.b_dec,
        }
        if transcoders.config.activation == "jumprelu":
            tensors[THRESHOLD_KEY] = folded.threshold
        if folded.W_skip is not None:
            tensors["W_skip"] = folded.W_skip.T  # ours x @ W, theirs x @ W.T
        files[f"layer_{layer}.safetensors"] = tensors
    return files


def _clt_files(transcoders: TranscoderSet) -> dict[str, dict[str, Tensor]]:
    files = {}
    for layer in transcoders.layers:
        folded = transcoders.folded(layer)
        encoder = {
            f"W_enc_{layer}": folded.W_enc.T,
            f"b_enc_{layer}": folded.b_enc,
            f"b_dec_{layer}": folded.b_dec,
        }
        if transcoders.config.activation == "jumprelu":
            encoder[f"threshold_{layer}"] = folded.threshold
        files[f"W_enc_{layer}.safetensors"] = encoder
        files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": folded.W_dec}
    return files


def _yaml_config(config: TranscoderConfig) -> dict[str, Any]:
    from tzoo import __version__

    data: dict[str, Any] = {
        "model_kind": "cross_layer_transcoder" if config.kind == "clt" else "transcoder_set",
        "model_name": HUB_IDS.get(config.model_name, config.model_name),
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
    }
    if config.activation == "topk":
        data["activation"] = "topk"
        data["k"] = config.top_k
    ours = config.to_dict()
    data["tzoo"] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tzoo_version": __version__,
        "model": ours.pop("model_name"),
        **_plain(ours),
    }
    return data


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: ``yaml.safe_dump`` writes only plain types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# -- loading ----------------------------------------------------------------------------------


@dataclass
class _LayerWeights:
    """One layer's weights in our orientation (model units)."""

    W_enc: Tensor  # (d, F)
    b_enc: Tensor  # (F,)
    W_dec: Tensor  # (F, d) or (F, n_later, d)
    b_dec: Tensor  # (d,)
    threshold: Tensor | None  # (F,)
    W_skip: Tensor | None  # (d, d), applied x @ W_skip


def load_transcoders(directory: Path | str, *, handle: ModelHandle | None = None) -> TranscoderSet:
    """The transcoders saved in ``directory`` (ours, or circuit-tracer's: see the module
    docstring), with scales 1. With ``handle``, check they fit its model (raising
    TranscoderMismatchError) and take its number of layers for sets that do not say."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise TranscodersNotFoundError(
            f"No transcoders in {directory}: it has no {CONFIG_FILE}. Train some with "
            "`tzoo transcoders train --model NAME`."
        )
    raw = read_yaml_config(config_path)
    if _model_kind(raw, config_path) == "cross_layer_transcoder":
        weights = _read_clt(directory, raw)
        kind = "clt"
    else:
        weights = _read_layer_set(directory, raw)
        kind = "skip" if any(w.W_skip is not None for w in weights.values()) else "plt"
    config = _config_of(raw, weights, kind, directory, handle)
    transcoders = TranscoderSet(config)
    _assign(transcoders, weights, directory)
    if handle is not None:
        check_compatible(transcoders, handle)
    return transcoders.eval()


def read_yaml_config(path: Path) -> dict[str, Any]:
    """``config.yaml`` as a dict; TranscoderFormatError when it is not one."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TranscoderFormatError(f"{path} is not readable YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TranscoderFormatError(f"{path} is not a transcoder config (not a mapping).")
    ours = data.get("tzoo")
    if isinstance(ours, dict) and ours.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise TranscoderFormatError(
            f"{path} was written by a newer tzoo (format version {ours['format_version']}); "
            f"this one reads version {FORMAT_VERSION}."
        )
    return data


def _model_kind(raw: dict[str, Any], path: Path) -> str:
    kind = raw.get("model_kind", "transcoder_set" if "transcoders" in raw else None)
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise TranscoderFormatError(
            f"{path}: model_kind must be transcoder_set or cross_layer_transcoder; got {kind!r}."
        )
    return str(kind)


def _sites(raw: dict[str, Any], path: Path) -> tuple[str, str]:
    hook_in = str(raw.get("feature_input_hook", INPUT_HOOK))
    hook_out = str(raw.get("feature_output_hook", OUTPUT_HOOK))
    if hook_in not in _INPUT_HOOKS or hook_out not in _OUTPUT_HOOKS:
        raise TranscoderFormatError(
            f"{path}: transcoders reading {hook_in!r} and writing {hook_out!r} do not map to "
            f"tzoo's hook points; supported: inputs {', '.join(_INPUT_HOOKS)}, outputs "
            f"{', '.join(_OUTPUT_HOOKS)}."
        )
    return _INPUT_HOOKS[hook_in], _OUTPUT_HOOKS[hook_out]


def _layer_paths(directory: Path, raw: dict[str, Any]) -> dict[int, Path]:
    """Model layer -> file: the ``transcoders`` list when there is one, else the
    ``layer_{i}.safetensors`` files."""
    listed = raw.get("transcoders")
    ours = _declared_layers(raw)
    if listed is None and ours is not None:
        return {layer: directory / f"layer_{layer}.safetensors" for layer in ours}
    if listed is None:
        found = {}
        for path in directory.iterdir():
            match = _LAYER_FILE.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))
    if not isinstance(listed, list):
        raise TranscoderFormatError(f"{directory / CONFIG_FILE}: transcoders must be a list.")
    paths: dict[int, Path] = {}
    for index, entry in enumerate(listed):
        # circuit-tracer 0.5: a path per layer; earlier: {id, layer, filepath}
        layer, where = (
            (int(entry["layer"]), str(entry["filepath"]))
            if isinstance(entry, dict)
            else (index, str(entry))
        )
        if where.startswith("hf://"):
            raise TranscoderFormatError(
                f"{directory / CONFIG_FILE} points at {where} on the hub; download the files "
                "next to config.yaml (tzoo reads local files only)."
            )
        paths[layer] = (directory / where) if not Path(where).is_absolute() else Path(where)
    return dict(sorted(paths.items()))


def _read_layer_set(directory: Path, raw: dict[str, Any]) -> dict[int, _LayerWeights]:
    paths = _layer_paths(directory, raw)
    if not paths:
        raise TranscoderFormatError(
            f"{directory} has a {CONFIG_FILE} but no layer_{{i}}.safetensors files."
        )
    weights = {}
    for layer, path in paths.items():
        tensors = _read_safetensors(path)
        missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in tensors]
        if missing:
            raise TranscoderFormatError(f"{path} lacks {', '.join(missing)}.")
        if "log_thresholds" in tensors:
            raise TranscoderFormatError(f"{path}: log_thresholds are not supported.")
        f, d = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
        _expect(path, "W_enc", tensors["W_enc"], (f, d))
        w_dec = tensors["W_dec"]
        if tuple(w_dec.shape) == (d, f) and d != f:
            w_dec = w_dec.T  # the older circuit-tracer layout, (d_model, d_transcoder)
        _expect(path, "W_dec", w_dec, (f, d))
        threshold = tensors.get(THRESHOLD_KEY, tensors.get("threshold"))
        if threshold is not None:
            threshold = _expect(path, THRESHOLD_KEY, threshold.reshape(-1), (f,))
        skip = tensors.get("W_skip")
        if skip is not None:
            skip = _expect(path, "W_skip", skip, (d, d)).T
        weights[layer] = _LayerWeights(
            W_enc=tensors["W_enc"].T,
            b_enc=_expect(path, "b_enc", tensors["b_enc"], (f,)),
            W_dec=w_dec,
            b_dec=_expect(path, "b_dec", tensors["b_dec"], (d,)),
            threshold=threshold,
            W_skip=skip,
        )
    return weights


def _declared_layers(raw: dict[str, Any]) -> list[int] | None:
    """The layers our own ``tzoo:`` key lists, so a missing file is named."""
    ours = raw.get("tzoo")
    if isinstance(ours, dict) and isinstance(ours.get("layers"), list):
        return sorted(int(layer) for layer in ours["layers"])
    return None


def _read_clt(directory: Path, raw: dict[str, Any]) -> dict[int, _LayerWeights]:
    layers = _declared_layers(raw) or sorted(
        int(m.group(1)) for p in directory.iterdir() if (m := _ENCODER_FILE.match(p.name))
    )
    if not layers:
        raise TranscoderFormatError(
            f"{directory} holds a cross-layer transcoder config but no W_enc_{{i}}.safetensors."
        )
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise TranscoderFormatError(
            f"{directory}: a cross-layer transcoder needs consecutive layers; found {layers}."
        )
    weights = {}
    for position, layer in enumerate(layers):
        enc_path = directory / f"W_enc_{layer}.safetensors"
        dec_path = directory / f"W_dec_{layer}.safetensors"
        for path in (enc_path, dec_path):
            if not path.is_file():
                raise TranscoderFormatError(f"{directory} lacks {path.name}.")
        enc = _read_safetensors(enc_path)
        names = [f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"]
        missing = [k for k in names if k not in enc]
        if missing:
            raise TranscoderFormatError(f"{enc_path} lacks {', '.join(missing)}.")
        w_enc, b_enc, b_dec = (enc[k] for k in names)
        f, d = b_enc.shape[0], b_dec.shape[0]
        dec = _read_safetensors(dec_path)
        if f"W_dec_{layer}" not in dec:
            raise TranscoderFormatError(f"{dec_path} lacks W_dec_{layer}.")
        threshold = enc.get(f"threshold_{layer}")
        weights[layer] = _LayerWeights(
            W_enc=_expect(enc_path, names[0], w_enc, (f, d)).T,
            b_enc=_expect(enc_path, names[1], b_enc, (f,)),
            W_dec=_expect(
                dec_path, f"W_dec_{layer}", dec[f"W_dec_{layer}"], (f, len(layers) - position, d)
            ),
            b_dec=_expect(enc_path, names[2], b_dec, (d,)),
            threshold=None
            if threshold is None
            else _expect(enc_path, f"threshold_{layer}", threshold.reshape(-1), (f,)),
            W_skip=None,
        )
    return weights


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise TranscoderFormatError(f"Missing transcoder file {path}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key).float() for key in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise TranscoderFormatError(f"{path} is not a readable safetensors file: {exc}") from None


def _expect(path: Path, name: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(tensor.shape) != shape:
        raise TranscoderFormatError(
            f"{path}: {name} has shape {tuple(tensor.shape)}; expected {shape} "
            "(d_transcoder, [layers written to,] d_model as the other tensors say)."
        )
    return tensor


def _config_of(
    raw: dict[str, Any],
    weights: dict[int, _LayerWeights],
    kind: str,
    directory: Path,
    handle: ModelHandle | None,
) -> TranscoderConfig:
    config_path = directory / CONFIG_FILE
    layers = tuple(weights)
    first = weights[layers[0]]
    d_model, n_features = first.b_dec.shape[0], first.b_enc.shape[0]
    for layer, w in weights.items():
        if (w.b_dec.shape[0], w.b_enc.shape[0]) != (d_model, n_features):
            raise TranscoderFormatError(
                f"{directory}: layer {layer} has d_model {w.b_dec.shape[0]} and "
                f"{w.b_enc.shape[0]} features; layer {layers[0]} has {d_model} and {n_features}."
            )
    ours = raw.get("tzoo")
    try:
        if isinstance(ours, dict):
            config = TranscoderConfig.from_dict({**ours, "model_name": ours.get("model")})
            found = (config.kind, config.layers, config.d_model, config.n_features)
            if found != (kind, layers, d_model, n_features):
                raise TranscoderFormatError(
                    f"{config_path} says kind {config.kind}, layers {list(config.layers)}, "
                    f"d_model {config.d_model}, {config.n_features} features; the files hold "
                    f"{kind}, {list(layers)}, {d_model}, {n_features}."
                )
            return config
        input_site, output_site = _sites(raw, config_path)
        topk = raw.get("activation") == "topk"
        n_model_layers = handle.n_layers if handle is not None else layers[-1] + 1
        return TranscoderConfig(
            model_name=str(raw.get("model_name") or directory.name),
            kind=kind,  # type: ignore[arg-type]
            d_model=d_model,
            n_features=n_features,
            layers=layers,
            n_model_layers=max(n_model_layers, layers[-1] + 1),
            activation="topk" if topk else "jumprelu",
            top_k=int(raw.get("k") or 1) if topk else 32,
            input_site=input_site,
            output_site=output_site,
            training={"source": "circuit-tracer", "config": _plain(raw)},
        )
    except (TranscoderConfigError, KeyError, TypeError) as exc:
        raise TranscoderFormatError(
            f"{config_path} does not describe a transcoder set: {exc}"
        ) from None


@torch.no_grad()
def _assign(transcoders: TranscoderSet, weights: dict[int, _LayerWeights], where: Path) -> None:
    jumprelu = transcoders.config.activation == "jumprelu"
    for layer, w in weights.items():
        i = transcoders.index(layer)
        transcoders.W_enc[i].copy_(w.W_enc)
        transcoders.b_enc[i].copy_(w.b_enc)
        transcoders.W_dec[i].copy_(w.W_dec)
        transcoders.b_dec[i].copy_(w.b_dec)
        if jumprelu:
            # No threshold in the file: a ReLU transcoder, JumpReLU with threshold 0.
            transcoders.threshold[i].copy_(w.threshold if w.threshold is not None else 0.0)
        if transcoders.config.kind == "skip":
            if w.W_skip is None:
                raise TranscoderFormatError(f"{where}: layer {layer} has no W_skip; others do.")
            transcoders.W_skip[i].copy_(w.W_skip)


def check_compatible(transcoders: TranscoderSet, handle: ModelHandle) -> None:
    """Raise TranscoderMismatchError unless ``transcoders`` were made for ``handle``'s model."""
    config = transcoders.config
    names = {handle.name, HUB_IDS.get(handle.name)}
    problems = []
    if config.model_name not in names:
        problems.append(f"they were trained on {config.model_name}")
    if config.d_model != handle.d_model:
        problems.append(f"their d_model is {config.d_model}, the model's {handle.d_model}")
    if config.layers[-1] >= handle.n_layers:
        problems.append(f"they cover layers up to {config.layers[-1]} of {handle.n_layers}")
    elif config.n_model_layers != handle.n_layers:
        problems.append(f"they were made for {config.n_model_layers} layers, not {handle.n_layers}")
    if problems:
        raise TranscoderMismatchError(
            f"These transcoders do not fit {handle.name}: {'; '.join(problems)}."
        )


# -- listing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedTranscoders:
    """What ``tzoo transcoders list`` shows about one saved set (read from config.yaml)."""

    path: Path
    model_name: str
    kind: str
    activation: str
    layers: list[int]
    n_features: int | None
    tokens: int | None  # training tokens, for sets tzoo trained
    explained_variance: float | None  # mean over layers on held-out text, when measured
    next_token_agreement: float | None


def list_saved_transcoders(root: Path | None = None) -> list[SavedTranscoders]:
    """Every set under ``root`` (default ``transcoders_root()``), by path."""
    root = root or transcoders_root()
    return [summary for path in _config_files(root) if (summary := _summary(path)) is not None]


def _config_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for path in sorted(root.rglob(CONFIG_FILE)):
        if "checkpoints" not in path.relative_to(root).parts:
            yield path


def _summary(path: Path) -> SavedTranscoders | None:
    try:
        raw = read_yaml_config(path)
        kind_field = _model_kind(raw, path)
    except TranscoderFormatError:
        return None
    ours = raw.get("tzoo") if isinstance(raw.get("tzoo"), dict) else None
    if ours is not None:
        training = ours.get("training") or {}
        evaluation = training.get("evaluation") or {}
        rows = evaluation.get("layers") or []
        variance = [row["explained_variance"] for row in rows if "explained_variance" in row]
        return SavedTranscoders(
            path=path.parent,
            model_name=str(ours.get("model")),
            kind=str(ours.get("kind")),
            activation=str(ours.get("activation")),
            layers=[int(x) for x in ours.get("layers") or []],
            n_features=ours.get("n_features"),
            tokens=training.get("tokens_seen"),
            explained_variance=sum(variance) / len(variance) if variance else None,
            next_token_agreement=evaluation.get("next_token_agreement"),
        )
    clt = kind_field == "cross_layer_transcoder"
    pattern = _ENCODER_FILE if clt else _LAYER_FILE
    layers = sorted(int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name)))
    kind, activation, n_features = ("clt" if clt else "plt"), "relu", None
    if layers:
        first = path.parent / (f"W_enc_{layers[0]}" if clt else f"layer_{layers[0]}")
        keys, n_features = _peek(
            first.with_suffix(".safetensors"), f"b_enc_{layers[0]}" if clt else "b_enc"
        )
        if not clt and "W_skip" in keys:
            kind = "skip"
        if raw.get("activation") == "topk":
            activation = "topk"
        elif {THRESHOLD_KEY, "threshold", f"threshold_{layers[0]}"} & keys:
            activation = "jumprelu"
    return SavedTranscoders(
        path=path.parent,
        model_name=str(raw.get("model_name")),
        kind=kind,
        activation=activation,
        layers=layers,
        n_features=n_features,
        tokens=None,
        explained_variance=None,
        next_token_agreement=None,
    )


def _peek(path: Path, bias: str) -> tuple[set[str], int | None]:
    """The tensor names in a safetensors file and the length of ``bias`` (the number of
    features), without reading the weights."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            n = handle.get_slice(bias).get_shape()[0] if bias in keys else None
            return keys, n
    except (OSError, SafetensorError):
        return set(), None
