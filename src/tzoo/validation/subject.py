"""The model under test and the architecture-agnostic helpers the checks use.

A ``Subject`` wraps any language model (a Hugging Face model, a user's ``model.py``, a plain
``nn.Module``) behind one call, ``subject.logits(input_ids, attention_mask)`` -> (B, T, V)
float logits, whatever the model returns (a tensor, a tuple, a dict, a ModelOutput). It
knows the model's kind (decoder: causal; encoder: bidirectional; encoder-decoder: the
decoder's positions are the ones checked), its vocabulary size, its longest input, its pad
token and whether ``forward`` takes an attention mask.

Loading a user's code: ``load_subject("model.py", "config.json")`` imports the file and
builds its model from the config (a ``build_model(config)`` function, else the one
``nn.Module`` class the file defines, called with the config's keys or with the config). A
URL is only fetched and run with ``trust_remote_code=True``: the file is Python that runs
with your rights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SubjectKind = Literal["decoder", "encoder", "encoder-decoder"]
DEFAULT_VOCAB_SIZE = 50257  # GPT-2's, when nothing else tells
MAX_DOWNLOAD_BYTES = 5 * 2**20


class ModelCodeError(ValueError):
    """The model code or config cannot be loaded or does not build a model (with why)."""


class UntrustedCodeError(PermissionError):
    """Remote code asked for without ``trust_remote_code``."""


# -- helpers ------------------------------------------------------------------------------------


def unwrap_logits(output: Any) -> Tensor:
    """The logits in whatever a model returned: a tensor; a ModelOutput or dict (its
    ``logits``, else its first tensor of 3 dimensions); a tuple or list (its first tensor
    of 3 dimensions, else its first tensor)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        values = list(output)
    else:
        raise TypeError(f"Cannot find logits in a {type(output).__name__}.")
    tensors = [v for v in values if isinstance(v, Tensor)]
    for tensor in tensors:
        if tensor.dim() == 3:
            return tensor
    if tensors:
        return tensors[0]
    raise TypeError(f"The model returned a {type(output).__name__} with no tensor in it.")


def detect_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else first buffer, else the CPU)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def detect_vocab_size(model: nn.Module, config: Any = None) -> tuple[int, str]:
    """(vocab size, where it came from): the config's ``vocab_size`` (or ``n_vocab``,
    ``num_tokens``), the model's config, the first embedding's rows, else GPT-2's 50257."""
    for source, where in ((config, "config"), (getattr(model, "config", None), "model config")):
        if source is not None:
            value = _config_value(source, "vocab_size", "n_vocab", "num_tokens")
            if isinstance(value, int) and value > 0:
                return value, where
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings), "first embedding"
    return DEFAULT_VOCAB_SIZE, "default (GPT-2's)"


_MAX_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "max_seq_length",
    "max_length",
    "max_len",
    "block_size",
    "context_length",
    "n_ctx",
)


def detect_max_length(model: nn.Module, config: Any = None) -> int | None:
    """The longest input the model takes, from its config, else the model's own attribute
    of the same names (a hand-built model's ``self.max_len``); None when nothing says."""
    for source in (config, getattr(model, "config", None), model):
        if source is not None:
            value = _config_value(source, *_MAX_LENGTH_KEYS)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _takes(forward: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def detect_kind(model: nn.Module, config: Any = None) -> SubjectKind:
    """Encoder-decoder, encoder or decoder: the user's config (``causal``, ``is_decoder``,
    ``is_encoder_decoder``), the model's config and class name; a plain module with nothing
    to say is taken as a decoder (a causal LM, the common case), and its causality check
    then tells whether it is one."""
    for source in (config, getattr(model, "config", None)):
        if source is None:
            continue
        if _config_value(source, "is_encoder_decoder") is True:
            return "encoder-decoder"
        causal = _config_value(source, "causal", "is_causal")
        if isinstance(causal, bool):
            return "decoder" if causal else "encoder"
    name = type(model).__name__
    model_config = getattr(model, "config", None)
    if model_config is not None:
        if any(key in name for key in ("CausalLM", "LMHeadModel")):
            return "decoder"
        if getattr(model_config, "is_decoder", False):
            return "decoder"
        if any(key in name for key in ("MaskedLM", "BertModel", "Encoder", "ForSequence")):
            return "encoder"
        if getattr(model_config, "model_type", "") in ("bert", "roberta", "distilbert"):
            return "encoder"
    return "decoder"


# -- the model under test ----------------------------------------------------------------------


@dataclass
class Subject:
    """The model under test (see the module docstring)."""

    model: nn.Module
    name: str
    kind: SubjectKind
    vocab_size: int
    max_length: int | None
    pad_token_id: int | None
    takes_attention_mask: bool
    config: dict[str, Any] = field(default_factory=dict)
    # Builds a fresh, untrained model of the same architecture (None: not known).
    factory: Callable[[], nn.Module] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # where each fact came from

    @property
    def device(self) -> torch.device:
        return detect_device(self.model)

    @property
    def is_hf(self) -> bool:
        return hasattr(self.model, "config") and hasattr(self.model, "can_generate")

    @property
    def causal(self) -> bool:
        """Whether logits at a position may depend only on positions up to it (for an
        encoder-decoder: the decoder's)."""
        return self.kind in ("decoder", "encoder-decoder")

    def longest(self, wanted: int) -> int:
        """``wanted`` capped at the model's longest input."""
        return wanted if self.max_length is None else max(1, min(wanted, self.max_length))

    def random_ids(
        self, batch: int, length: int, generator: torch.Generator, *, low: int | None = None
    ) -> Tensor:
        """(batch, length) token ids drawn uniformly from the vocabulary above the pad id
        (and ``low``), on the model's device."""
        floor = low if low is not None else (self.pad_token_id or 0) + 1
        floor = min(floor, self.vocab_size - 1)
        ids = torch.randint(floor, self.vocab_size, (batch, length), generator=generator)
        return ids.to(self.device)

    def decoder_inputs(self, input_ids: Tensor) -> Tensor:
        """What an encoder-decoder's decoder reads in these checks: the input shifted right
        behind the start token (so the decoder's positions line up with the input's)."""
        start = _config_value(getattr(self.model, "config", {}), "decoder_start_token_id")
        start = int(start) if isinstance(start, int) else (self.pad_token_id or 0)
        shifted = input_ids.new_full(input_ids.shape, start)
        shifted[:, 1:] = input_ids[:, :-1]
        return shifted

    def call(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        decoder_input_ids: Tensor | None = None,
        model: nn.Module | None = None,
        **extra: Any,
    ) -> Any:
        """The raw output of ``model`` (default the subject's) on these inputs."""
        target = self.model if model is None else model
        kwargs: dict[str, Any] = dict(extra)
        if attention_mask is not None and self.takes_attention_mask:
            kwargs["attention_mask"] = attention_mask
        if self.kind == "encoder-decoder":
            kwargs["decoder_input_ids"] = (
                self.decoder_inputs(input_ids) if decoder_input_ids is None else decoder_input_ids
            )
        if self.is_hf:
            if self.kind != "encoder":  # no key/value cache: nothing generates here
                kwargs.setdefault("use_cache", False)
            return target(input_ids=input_ids, **kwargs)
        return target(input_ids, **kwargs)

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        decoder_input_ids: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        """(B, T, V) logits as float32 (for an encoder-decoder, at the decoder's positions)."""
        output = self.call(
            input_ids, attention_mask, decoder_input_ids=decoder_input_ids, model=model
        )
        return unwrap_logits(output).float()

    def fresh_model(self) -> nn.Module:
        """A new model of the same architecture with fresh weights: the factory's, else a
        deep copy with every module's parameters reset where it can be."""
        if self.factory is not None:
            return self.factory().to(self.device)
        import copy

        clone = copy.deepcopy(self.model)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        return clone


def subject_from_module(
    model: nn.Module,
    config: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    kind: SubjectKind | None = None,
    factory: Callable[[], nn.Module] | None = None,
    pad_token_id: int | None = None,
) -> Subject:
    """A Subject for ``model``, its facts read from ``config`` and the model itself."""
    if not isinstance(model, nn.Module):
        raise ModelCodeError(f"Expected a torch.nn.Module; got a {type(model).__name__}.")
    cfg = dict(config or {})
    vocab, vocab_from = detect_vocab_size(model, cfg)
    model_config = getattr(model, "config", None)
    pad = pad_token_id
    if pad is None:
        pad = _config_value(cfg, "pad_token_id")
    if pad is None and model_config is not None:
        pad = getattr(model_config, "pad_token_id", None)
    return Subject(
        model=model,
        name=name or str(cfg.get("name") or type(model).__name__),
        kind=kind or detect_kind(model, cfg),
        vocab_size=vocab,
        max_length=detect_max_length(model, cfg),
        pad_token_id=pad if isinstance(pad, int) else None,
        takes_attention_mask=_takes(model.forward, "attention_mask"),
        config=cfg,
        factory=factory,
        notes={"vocab_size": vocab_from},
    )


# -- loading a user's code ---------------------------------------------------------------------


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _fetch(url: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=30) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ModelCodeError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes.")
                chunks.append(chunk)
    except httpx.HTTPError as error:
        raise ModelCodeError(f"Cannot fetch {url}: {error}") from None
    return b"".join(chunks)


def read_config(
    config: str | Path | Mapping[str, Any] | None, *, trust_remote_code: bool
) -> dict[str, Any]:
    """A config as a dict: a mapping, a JSON file, or a JSON URL (with trust)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    text_source = str(config)
    # Refused before the try: UntrustedCodeError is a PermissionError, hence an OSError.
    if _is_url(text_source) and not trust_remote_code:
        raise UntrustedCodeError(
            f"Refusing to fetch {text_source}: remote model files are only fetched with "
            "--trust-remote-code (trust_remote_code=True)."
        )
    try:
        if _is_url(text_source):
            text = _fetch(text_source).decode("utf-8")
        else:
            text = Path(text_source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelCodeError(f"Cannot read the config {text_source}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelCodeError(f"The config {text_source} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ModelCodeError(f"The config {text_source} must be a JSON object.")
    return data


def import_model_file(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The module of a ``model.py``: a local file, or a URL fetched and imported only with
    ``trust_remote_code`` (refused with UntrustedCodeError otherwise)."""
    source = str(path)
    if _is_url(source):
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"Refusing to run code from {source}: a model.py is Python that runs with your "
                "rights. Read it, then pass --trust-remote-code (trust_remote_code=True)."
            )
        code = _fetch(source)
        digest = hashlib.sha256(code).hexdigest()[:16]
        cache = Path.home() / ".cache" / "tzoo" / "remote_code"
        cache.mkdir(parents=True, exist_ok=True)
        file = cache / f"model_{digest}.py"
        file.write_bytes(code)
    else:
        file = Path(source)
        if not file.is_file():
            raise ModelCodeError(f"No model file at {file}.")
    module_name = f"tzoo_user_model_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ModelCodeError(f"Cannot import {file} as Python.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise ModelCodeError(f"Importing {file} failed: {type(error).__name__}: {error}") from None
    return module


def model_builder(module: Any, config: Mapping[str, Any]) -> Callable[[], nn.Module]:
    """How ``module`` builds its model from ``config``: its ``build_model(config)`` (or
    ``create_model``), else the class the config names (``model_class``), else the one
    ``nn.Module`` subclass defined in the file, called with the config's keys or with the
    config itself."""
    for name in ("build_model", "create_model"):
        function = getattr(module, name, None)
        if callable(function):
            return lambda: function(dict(config))
    wanted = config.get("model_class")
    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, nn.Module)
        and value.__module__ == module.__name__
    ]
    if wanted:
        chosen = [c for c in classes if c.__name__ == wanted]
        if not chosen:
            raise ModelCodeError(
                f"The config names model_class {wanted!r}; the file defines "
                f"{', '.join(c.__name__ for c in classes) or 'no nn.Module'}."
            )
        classes = chosen
    else:
        # The model is the class no other class of the file builds as a part.
        top = [c for c in classes if not any(_builds(other, c) for other in classes)]
        classes = top if len(top) == 1 else classes
    if len(classes) != 1:
        raise ModelCodeError(
            "Cannot tell which class is the model: define build_model(config), or name it "
            f'with "model_class" in the config (the file defines '
            f"{', '.join(c.__name__ for c in classes) or 'no nn.Module'})."
        )
    cls = classes[0]
    # The config also holds facts for the checks (name, causal, max_length...): pass the
    # class only the keys its __init__ takes, unless it takes **kwargs.
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in config.items() if takes_any or k in parameters}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("model_class", "name", "causal")}
    named = [p for p in parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]

    def build() -> nn.Module:
        if kwargs or not named or all(p.default is not p.empty for p in named):
            return cls(**kwargs)
        return cls(dict(config))  # a class that takes the config itself

    return build


def _builds(owner: type, part: type) -> bool:
    """Whether ``owner``'s ``__init__`` calls ``part`` by name (a part, not the model)."""
    if owner is part:
        return False
    try:
        source = inspect.getsource(vars(owner).get("__init__", owner))
    except (OSError, TypeError):
        return False
    return f"{part.__name__}(" in source


def load_subject(
    source: str | Path | nn.Module,
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    trust_remote_code: bool = False,
    manager: Any = None,
    seed: int = 0,
) -> Subject:
    """The Subject for ``source``: an ``nn.Module``; a ``model.py`` (local, or a URL with
    ``trust_remote_code``) built from ``config``; or a catalogue name, local model
    directory or hub id loaded through ``manager`` (default the Python API's)."""
    if isinstance(source, nn.Module):
        return subject_from_module(source, read_config(config, trust_remote_code=False))
    text = str(source)
    if text.endswith(".py"):
        cfg = read_config(config, trust_remote_code=trust_remote_code)
        module = import_model_file(text, trust_remote_code=trust_remote_code)
        build = model_builder(module, cfg)

        def factory() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                built = build()
            if not isinstance(built, nn.Module):
                raise ModelCodeError(f"{text} built a {type(built).__name__}, not an nn.Module.")
            return built

        try:
            model = factory()
        except ModelCodeError:
            raise
        except Exception as error:
            raise ModelCodeError(
                f"Building the model from {text} failed: {type(error).__name__}: {error}"
            ) from None
        name = str(cfg.get("name") or Path(text.split("?")[0]).stem)
        return subject_from_module(model.eval(), cfg, name=name, factory=factory)
    if _is_url(text):
        raise ModelCodeError(f"{text}: give the URL of a model.py (and --config for its JSON).")
    from tzoo.api import default_manager

    handle = (manager or default_manager()).get(text)
    tokenizer = handle.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    subject = subject_from_module(
        handle.model,
        read_config(config, trust_remote_code=trust_remote_code),
        name=handle.name,
        kind=handle.architecture,
        pad_token_id=pad,
    )
    subject.notes["tokenizer"] = type(tokenizer).__name__
    return subject


# -- attention capture -------------------------------------------------------------------------


@dataclass
class CapturedAttention:
    """Attention weights recorded during one forward pass: ``(B, heads, Tq, Tk)`` each, in
    the order they were computed, with where each came from."""

    weights: list[Tensor] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def _explicit_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """scaled_dot_product_attention written out, returning (output, weights)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query @ key.transpose(-2, -1)) * factor
    tq, tk = scores.shape[-2], scores.shape[-1]
    if is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ value, weights


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[CapturedAttention]:
    """Record every attention pattern ``model`` computes inside the block, whichever way it
    computes them: ``nn.MultiheadAttention`` (PyTorch's fused fast path is switched off and
    each call asked for per-head weights), and ``F.scaled_dot_product_attention`` (replaced
    for the block by the same computation written out, which also yields the weights).
    Hugging Face models computing weights themselves are read with ``output_attentions``
    by the caller; see ``attention_patterns``."""
    captured = CapturedAttention()
    originals: list[tuple[nn.MultiheadAttention, Any]] = []
    names = {module: name for name, module in model.named_modules()}

    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            forward = module.forward

            def wrapped(
                *args: Any, _forward: Any = forward, _module: Any = module, **kwargs: Any
            ) -> Any:
                kwargs["need_weights"] = True
                kwargs["average_attn_weights"] = False
                output, weights = _forward(*args, **kwargs)
                if weights is not None:
                    captured.weights.append(weights.detach())
                    captured.sources.append(
                        f"{names.get(_module, 'attention')} (MultiheadAttention)"
                    )
                return output, weights

            originals.append((module, forward))
            module.forward = wrapped  # type: ignore[method-assign]

    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args: Any, **kwargs: Any) -> Tensor:
        output, weights = _explicit_sdpa(*args, **kwargs)
        captured.weights.append(weights.detach())
        captured.sources.append("scaled_dot_product_attention")
        return output

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    F.scaled_dot_product_attention = recording_sdpa
    try:
        yield captured
    finally:
        F.scaled_dot_product_attention = real_sdpa
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, forward in originals:
            module.forward = forward  # type: ignore[method-assign]


def attention_patterns(subject: Subject, input_ids: Tensor) -> CapturedAttention:
    """Every attention pattern of ``subject`` on ``input_ids``: a Hugging Face model's own
    (``output_attentions``, eager attention), else whatever ``capture_attention`` records."""
    if subject.is_hf:
        set_impl = getattr(subject.model, "set_attn_implementation", None)
        previous = getattr(subject.model.config, "_attn_implementation", None)
        if callable(set_impl) and previous != "eager":
            with contextlib.suppress(Exception):
                set_impl("eager")
        try:
            with torch.no_grad():
                output = subject.call(input_ids, output_attentions=True)
        finally:
            if callable(set_impl) and previous not in (None, "eager"):
                with contextlib.suppress(Exception):
                    set_impl(previous)
        found = CapturedAttention()
        for field_name in ("attentions", "encoder_attentions", "decoder_attentions"):
            for index, weights in enumerate(getattr(output, field_name, None) or ()):
                found.weights.append(weights.detach())
                found.sources.append(f"{field_name}[{index}]")
        if found.weights:
            return found
    with capture_attention(subject.model) as captured, torch.no_grad():
        subject.call(input_ids)
    return captured
