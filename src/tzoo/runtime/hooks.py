"""Named hook points on unmodified Hugging Face models: read, cache and patch activations.

Every analysis (attention viewer, logit lens, patchscopes, transcoders, circuits) reaches a
model's insides through this module, much as TransformerLens does with its hook points, but
on top of the model transformers loaded: nothing is rewritten, PyTorch forward hooks are
installed for one call and removed afterwards.

A hook point is named ``"{stack}.{layer}.{site}"``, e.g. ``"decoder.3.resid_post"``. Stacks:
``"decoder"`` (decoder-only models), ``"encoder"`` (encoder-only models), both for T5. Sites,
each a ``(batch, T, d_model)`` tensor:

- ``resid_pre``: the block's input, the residual stream before the block.
- ``attn_out``: what self-attention adds to the residual (after its output projection,
  before the add; BERT: ``attention.output.dense``, before its add + LayerNorm).
- ``cross_out``: T5 decoder only, what cross-attention adds to the residual.
- ``mlp_in``: what the MLP reads. Llama, GPT-2, T5: the residual after the MLP's pre-norm.
  BERT: the attention sublayer's output (post-LayerNorm), fed to ``intermediate``; it is
  also the residual BERT adds the MLP's output to, so patching it changes both.
- ``mlp_out``: what the MLP adds (BERT: ``output.dense``, before its add + LayerNorm).
- ``resid_post``: the block's output, the residual stream after the block.

Architectures are adapters registered by ``config.model_type`` (``register_adapter``);
built-ins go through the same registry as third-party ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tzoo.runtime.errors import ModelError, UnsupportedArchitectureError
from tzoo.runtime.handle import ModelHandle

Tensor = torch.Tensor
PatchFn = Callable[[Tensor], Tensor | None]
Target = ModelHandle | nn.Module  # a handle, or a bare model


class UnknownHookPointError(ModelError, ValueError):
    """A hook point name, stack, layer or site that this model does not have."""


# -- adapters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where a site lives inside a block: a submodule path (``""``: the block itself; a
    negative index such as ``"layer.-1"`` counts from the end of a ModuleList) and whether
    the value is that module's first input or its first output."""

    path: str
    reads: Literal["input", "output"]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How one family lays out its modules. Paths start at ``model.base_model`` (so
    ``GPT2LMHeadModel`` and ``GPT2Model`` share one adapter) and are dotted attribute names.

    ``stacks`` maps a stack name to its block list; a stack whose path is missing on a given
    model (T5EncoderModel has no decoder) is simply absent. ``attention_fields`` names the
    model-output field holding each stack's attention weights under ``output_attentions``.
    """

    stacks: Mapping[str, str]
    sites: Mapping[str, Site]
    attention_path: str  # in a block: the module that computes the attention weights
    mlp_path: str  # in a block: the module that reads mlp_in
    final_norms: Mapping[str, str] = field(default_factory=dict)
    attention_fields: Mapping[str, str] = field(default_factory=dict)
    cross_attention_field: str | None = None

    def stack_names(self, model: nn.Module) -> list[str]:
        return [s for s, path in self.stacks.items() if _resolve(_base(model), path) is not None]

    def blocks(self, model: nn.Module, stack: str) -> nn.ModuleList:
        found = _resolve(_base(model), self.stacks.get(stack, "\0"))
        if not isinstance(found, nn.ModuleList):
            names = ", ".join(self.stack_names(model))
            raise UnknownHookPointError(f"No stack {stack!r} in this model; it has: {names}.")
        return found

    def attention(self, block: nn.Module) -> nn.Module:
        """The module computing attention weights (Q/K/V live here). BERT: ``attention.self``."""
        return _require(block, self.attention_path)

    def mlp(self, block: nn.Module) -> nn.Module:
        """The module reading ``mlp_in``. BERT splits its MLP: this is ``intermediate``
        (dense + activation); its second half, ``output.dense``, gives ``mlp_out``."""
        return _require(block, self.mlp_path)

    def site_module(self, block: nn.Module, site: str) -> nn.Module | None:
        """The module a site hooks in ``block``, or None where the block lacks it."""
        where = self.sites.get(site)
        return None if where is None else _resolve(block, where.path)

    def embedding(self, model: nn.Module) -> nn.Module:
        """The token embedding (``nn.Embedding``): ``embed_tokens``, ``wte``, ``shared``..."""
        return _require_pretrained(model).get_input_embeddings()

    def final_norm(self, model: nn.Module, stack: str) -> nn.Module | None:
        """The norm applied after the stack's last block (llama ``norm``, GPT-2 ``ln_f``,
        T5 ``final_layer_norm`` per stack); None for BERT, whose blocks end in LayerNorm."""
        path = self.final_norms.get(stack)
        return None if path is None else _resolve(_base(model), path)

    def unembedding(self, model: nn.Module) -> nn.Module | None:
        """The output projection to the vocabulary (``lm_head``), None for a bare encoder.
        T5 with tied embeddings scales the decoder output by ``d_model ** -0.5`` first; a
        BERT masked-LM head applies its ``transform`` before this ``decoder`` layer."""
        output = _require_pretrained(model).get_output_embeddings()
        return output if isinstance(output, nn.Module) else None


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(model_type: str, adapter: ArchitectureAdapter) -> None:
    """Make hook points available for models whose ``config.model_type`` is ``model_type``."""
    _ADAPTERS[model_type] = adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(target: Target) -> ArchitectureAdapter:
    """The adapter for this model, or UnsupportedArchitectureError naming the supported types."""
    model_type = getattr(getattr(_model_of(target), "config", None), "model_type", None)
    adapter = _ADAPTERS.get(str(model_type))
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"No activation hooks for model type {model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())}. Add one with "
            "tzoo.runtime.hooks.register_adapter()."
        )
    return adapter


_PRE_NORM_SITES = {
    "resid_pre": Site("", "input"),
    "attn_out": Site("{attn}", "output"),
    "mlp_in": Site("{mlp}", "input"),
    "mlp_out": Site("{mlp}", "output"),
    "resid_post": Site("", "output"),
}


def _pre_norm_sites(attn: str, mlp: str) -> dict[str, Site]:
    return {
        name: Site(site.path.format(attn=attn, mlp=mlp), site.reads)
        for name, site in _PRE_NORM_SITES.items()
    }


LLAMA = ArchitectureAdapter(
    stacks={"decoder": "layers"},
    sites=_pre_norm_sites("self_attn", "mlp"),
    attention_path="self_attn",
    mlp_path="mlp",
    final_norms={"decoder": "norm"},
    attention_fields={"decoder": "attentions"},
)
GPT2 = ArchitectureAdapter(
    stacks={"decoder": "h"},
    sites=_pre_norm_sites("attn", "mlp"),
    attention_path="attn",
    mlp_path="mlp",
    final_norms={"decoder": "ln_f"},
    attention_fields={"decoder": "attentions"},
)
BERT = ArchitectureAdapter(
    stacks={"encoder": "encoder.layer"},
    sites={
        "resid_pre": Site("", "input"),
        "attn_out": Site("attention.output.dense", "output"),
        "mlp_in": Site("attention", "output"),
        "mlp_out": Site("output.dense", "output"),
        "resid_post": Site("", "output"),
    },
    attention_path="attention.self",
    mlp_path="intermediate",
    attention_fields={"encoder": "attentions"},
)
T5 = ArchitectureAdapter(
    stacks={"encoder": "encoder.block", "decoder": "decoder.block"},
    sites={
        "resid_pre": Site("", "input"),
        "attn_out": Site("layer.0.SelfAttention", "output"),
        "cross_out": Site("layer.1.EncDecAttention", "output"),  # resolves in the decoder only
        "mlp_in": Site("layer.-1.DenseReluDense", "input"),
        "mlp_out": Site("layer.-1.DenseReluDense", "output"),
        "resid_post": Site("", "output"),
    },
    attention_path="layer.0.SelfAttention",
    mlp_path="layer.-1.DenseReluDense",
    final_norms={"encoder": "encoder.final_layer_norm", "decoder": "decoder.final_layer_norm"},
    attention_fields={"encoder": "encoder_attentions", "decoder": "decoder_attentions"},
    cross_attention_field="cross_attentions",
)

register_adapter("llama", LLAMA)
register_adapter("gpt2", GPT2)
register_adapter("bert", BERT)
register_adapter("t5", T5)


# -- hook point names -----------------------------------------------------------------------


class HookPoint(NamedTuple):
    stack: str
    layer: int
    site: str

    @property
    def name(self) -> str:
        return f"{self.stack}.{self.layer}.{self.site}"


def parse_hook_point(name: str) -> HookPoint:
    stack, _, rest = name.partition(".")
    layer, _, site = rest.partition(".")
    if not (stack and site and layer.isdigit()):
        raise UnknownHookPointError(
            f"Bad hook point {name!r}: expected '{{stack}}.{{layer}}.{{site}}', "
            "e.g. 'decoder.0.resid_post'."
        )
    return HookPoint(stack, int(layer), site)


def hook_points(target: Target) -> list[str]:
    """Every hook point of the model, stack by stack, layer by layer, in forward order."""
    model = _model_of(target)
    return _select(model, adapter_for(model), sites=None, stacks=None, layers=None)


def hook_module(target: Target, name: str) -> nn.Module:
    """The module whose input or output the hook point ``name`` reads."""
    model = _model_of(target)
    return _locate(model, adapter_for(model), name)[0]


def _sites_in(adapter: ArchitectureAdapter, block: nn.Module) -> list[str]:
    return [s for s in adapter.sites if adapter.site_module(block, s) is not None]


def _locate(model: nn.Module, adapter: ArchitectureAdapter, name: str) -> tuple[nn.Module, Site]:
    point = parse_hook_point(name)
    blocks = adapter.blocks(model, point.stack)
    if point.layer >= len(blocks):
        raise UnknownHookPointError(
            f"No layer {point.layer} in stack {point.stack!r} ({len(blocks)} layers)."
        )
    module = adapter.site_module(blocks[point.layer], point.site)
    if module is None:
        sites = ", ".join(_sites_in(adapter, blocks[point.layer]))
        raise UnknownHookPointError(
            f"No site {point.site!r} in stack {point.stack!r}; it has: {sites}."
        )
    return module, adapter.sites[point.site]


def _select(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    *,
    sites: str | Sequence[str] | None,
    stacks: str | Sequence[str] | None,
    layers: int | Sequence[int] | None,
) -> list[str]:
    """Names of the hook points picked by the filters (None: all), in forward order."""
    chosen_stacks = _stacks(model, adapter, stacks)
    wanted = _as_list(sites)
    for site in wanted or []:
        if site not in adapter.sites:
            known = ", ".join(adapter.sites)
            raise UnknownHookPointError(f"Unknown site {site!r}; sites are: {known}.")
    names = []
    for stack in chosen_stacks:
        blocks = adapter.blocks(model, stack)
        present = _sites_in(adapter, blocks[0]) if len(blocks) else []
        for layer in _layer_indices(layers, len(blocks), stack):
            names += [f"{stack}.{layer}.{s}" for s in present if wanted is None or s in wanted]
    return names


def _stacks(
    model: nn.Module, adapter: ArchitectureAdapter, stacks: str | Sequence[str] | None
) -> list[str]:
    available = adapter.stack_names(model)
    chosen = _as_list(stacks)
    for stack in chosen or []:
        if stack not in available:
            raise UnknownHookPointError(
                f"No stack {stack!r} in this model; it has: {', '.join(available)}."
            )
    return available if chosen is None else [s for s in available if s in chosen]


def _layer_indices(layers: int | Sequence[int] | None, n_layers: int, stack: str) -> list[int]:
    """Layer numbers in increasing order; negative ones count from the end, as in Python."""
    if layers is None:
        return list(range(n_layers))
    picked = [layers] if isinstance(layers, int) else list(layers)
    for layer in picked:
        if not -n_layers <= layer < n_layers:
            raise UnknownHookPointError(f"No layer {layer} in stack {stack!r} ({n_layers} layers).")
    return sorted({layer % n_layers for layer in picked})


# -- patching -------------------------------------------------------------------------------


@contextmanager
def patch(target: Target, fns: Mapping[str, PatchFn]) -> Iterator[None]:
    """Within the block, ``fns[name](value)`` sees each hook point's value on every forward
    pass; returning a tensor of the same shape replaces the value (what later modules see),
    returning None leaves it alone. Every hook is removed on exit, even after an exception.

    Hooks run in the order they were installed, so a ``run_with_cache`` inside a ``patch``
    records the patched values. They sit on the (shared) model itself: any other forward
    pass on the same model meanwhile sees them too, so callers hold the model for one job
    at a time. All names are checked before any hook is installed.
    """
    model = _model_of(target)
    adapter = adapter_for(model)
    located = [(name, *_locate(model, adapter, name), fn) for name, fn in fns.items()]
    handles: list[RemovableHandle] = []
    try:
        for name, module, site, fn in located:
            handles.append(_install(module, site, name, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _install(module: nn.Module, site: Site, name: str, fn: PatchFn) -> RemovableHandle:
    if site.reads == "output":

        def after(_module: nn.Module, _args: Any, output: Any) -> Any:
            new = fn(_first(output, name))
            return None if new is None else _with_first(output, _checked(name, output, new))

        return module.register_forward_hook(after)

    def before(
        _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if args:  # the hidden states are the first positional argument...
            new = fn(_first(args, name))
            return None if new is None else ((_checked(name, args[0], new), *args[1:]), kwargs)
        key = _tensor_kwarg(kwargs, name)  # ...or passed by keyword
        new = fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: _checked(name, kwargs[key], new)})

    return module.register_forward_pre_hook(before, with_kwargs=True)


def _first(value: Any, name: str) -> Tensor:
    """The hidden states in a module's output (or args): the tensor, or its first item."""
    first = value[0] if isinstance(value, tuple | list) and value else value
    if not isinstance(first, Tensor):
        raise ModelError(f"Hook point {name!r} found {type(first).__name__}, not a tensor.")
    return first


def _with_first(output: Any, new: Tensor) -> Any:
    """``output`` with its hidden states replaced (transformers 5 blocks return a tensor,
    older ones and attention modules a tuple)."""
    if isinstance(output, Tensor):
        return new
    return type(output)([new, *output[1:]])


def _checked(name: str, old: Any, new: Any) -> Tensor:
    old = old[0] if isinstance(old, tuple | list) else old
    if not isinstance(new, Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ModelError(
            f"The patch for {name!r} returned {got}; it must return None or a tensor of "
            f"shape {tuple(old.shape)}."
        )
    return new


def _tensor_kwarg(kwargs: dict[str, Any], name: str) -> str:
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return key
    raise ModelError(f"Hook point {name!r} found no tensor among the module's inputs.")


# -- caching --------------------------------------------------------------------------------


@dataclass(eq=False)
class ActivationCache(Mapping[str, Tensor]):
    """Activations of one forward pass: ``cache["decoder.0.resid_post"]`` is
    ``(batch, T, d_model)``; attention weights per stack; all detached copies.

    ``attentions[stack]`` is ``(layers, batch, heads, Tq, Tk)`` over ``attention_layers``
    (every query head, GQA key/value heads already repeated); ``cross_attentions`` is
    ``(layers, batch, heads, T_decoder, T_encoder)`` for T5.
    """

    activations: dict[str, Tensor]
    attentions: dict[str, Tensor] = field(default_factory=dict)
    cross_attentions: Tensor | None = None
    attention_layers: dict[str, list[int]] = field(default_factory=dict)
    n_layers: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.activations:
            raise KeyError(f"{name!r} was not captured; pass it in sites/stacks/layers.")
        return self.activations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def attention(self, stack: str | None = None) -> Tensor:
        """Self-attention weights of ``stack`` (default: the only one captured)."""
        stack = stack or self._only_stack()
        if stack not in self.attentions:
            raise KeyError(f"No attention weights for stack {stack!r}; run with attentions=True.")
        return self.attentions[stack]  # (layers, batch, heads, Tq, Tk)

    def cross_attention(self) -> Tensor:
        if self.cross_attentions is None:
            raise KeyError("No cross-attention weights: only T5's decoder has them.")
        return self.cross_attentions  # (layers, batch, heads, T_decoder, T_encoder)

    def residual_stack(self, stack: str | None = None) -> Tensor:
        """``(layers + 1, batch, T, d_model)``: the input of block 0 (the embedding output),
        then each block's output, all unnormed.

        transformers' ``output_hidden_states`` (5.23) gives the same entries except the last
        for llama, GPT-2 and T5 (both stacks): it ties that entry to ``last_hidden_state``,
        which has the final norm applied (``norm``, ``ln_f``, ``final_layer_norm``); here
        the last entry is the last block's output before that norm. For BERT, which has no
        final norm, all entries agree.
        """
        stack = stack or self._only_stack()
        n = self.n_layers.get(stack, 0)
        names = [f"{stack}.0.resid_pre", *(f"{stack}.{i}.resid_post" for i in range(n))]
        missing = [name for name in names if name not in self.activations]
        if not n or missing:
            raise KeyError(
                f"The residual stack of {stack!r} needs resid_pre and resid_post at every "
                f"layer; missing: {', '.join(missing) or stack}."
            )
        return torch.stack([self.activations[name] for name in names])

    def _only_stack(self) -> str:
        stacks = list(self.n_layers)
        if len(stacks) != 1:
            raise KeyError(f"Name the stack: this cache has {', '.join(stacks)}.")
        return stacks[0]


def run_with_cache(
    target: Target,
    inputs: Mapping[str, Any],
    *,
    sites: str | Sequence[str] | None = None,
    stacks: str | Sequence[str] | None = None,
    layers: int | Sequence[int] | None = None,
    attentions: bool = True,
    **model_kwargs: Any,
) -> tuple[Any, ActivationCache]:
    """One forward pass under ``torch.no_grad``, recording the chosen hook points (None: all)
    and, with ``attentions``, the attention weights from ``output_attentions=True`` (the
    model must use eager attention). ``inputs`` is the tokenizer's output; ``model_kwargs``
    go to the model as they are.

    For an encoder-decoder model without ``decoder_input_ids``, the decoder reads
    ``model._shift_right(input_ids)``: the input itself, teacher-forced, so both stacks
    have a position per input token (``[decoder_start_token_id]`` first).
    """
    model = _model_of(target)
    adapter = adapter_for(model)
    names = _select(model, adapter, sites=sites, stacks=stacks, layers=layers)
    store: dict[str, Tensor] = {}
    kwargs = _forward_kwargs(model, inputs, attentions, model_kwargs)
    with torch.no_grad(), patch(model, {name: _recorder(store, name) for name in names}):
        outputs = model(**kwargs)
    cache = ActivationCache(activations={n: store[n] for n in names if n in store})
    for stack in _stacks(model, adapter, stacks):
        cache.n_layers[stack] = len(adapter.blocks(model, stack))
        if attentions:
            _add_attentions(cache, model, adapter, outputs, stack, layers)
    return outputs, cache


def _recorder(store: dict[str, Tensor], name: str) -> PatchFn:
    def record(value: Tensor) -> None:
        # A copy: a later patch may edit the same tensor in place (resid_post of layer i is
        # the very tensor resid_pre of layer i + 1 reads).
        store[name] = value.detach().clone()

    return record


def _forward_kwargs(
    model: nn.Module, inputs: Mapping[str, Any], attentions: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    device = _device_of(model)
    kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    config = getattr(model, "config", None)
    wants_decoder = not {"decoder_input_ids", "decoder_inputs_embeds"} & kwargs.keys()
    if getattr(config, "is_encoder_decoder", False) and wants_decoder:
        kwargs["decoder_input_ids"] = _decoder_input_ids(model, kwargs["input_ids"])
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # no key/value cache to build for one pass
    if attentions:
        kwargs["output_attentions"] = True
    return {**kwargs, **extra, "return_dict": True}


def _decoder_input_ids(model: nn.Module, input_ids: Tensor) -> Tensor:
    shift_right = getattr(model, "_shift_right", None)
    if callable(shift_right):
        return shift_right(input_ids)  # (batch, T)
    config: Any = getattr(model, "config", None)
    start = int(config.decoder_start_token_id)
    return torch.full((input_ids.shape[0], 1), start, device=input_ids.device)  # (batch, 1)


def _add_attentions(
    cache: ActivationCache,
    model: nn.Module,
    adapter: ArchitectureAdapter,
    outputs: Any,
    stack: str,
    layers: int | Sequence[int] | None,
) -> None:
    picked = _layer_indices(layers, cache.n_layers[stack], stack)
    weights = getattr(outputs, adapter.attention_fields.get(stack, ""), None)
    if not weights or any(weights[i] is None for i in picked):
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ModelError(
            f"The model returned no attention weights (attention implementation "
            f"{implementation!r}); load it with attn_implementation='eager'."
        )
    cache.attention_layers[stack] = picked
    cache.attentions[stack] = torch.stack([weights[i].detach() for i in picked])
    cross = getattr(outputs, adapter.cross_attention_field or "", None)
    if stack == "decoder" and cross:
        cache.cross_attentions = torch.stack([cross[i].detach() for i in picked])


# -- helpers --------------------------------------------------------------------------------


def _model_of(target: Target) -> nn.Module:
    return target.model if isinstance(target, ModelHandle) else target


def _base(model: nn.Module) -> nn.Module:
    """The bare transformer under any head: GPT2LMHeadModel.transformer,
    LlamaForCausalLM.model, BertForMaskedLM.bert; the model itself when it is bare (or T5)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _require_pretrained(model: nn.Module) -> Any:
    if not hasattr(model, "get_input_embeddings"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not a transformers model; it has no embeddings."
        )
    return model


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path (negative indices allowed in lists), or None."""
    module: Any = root
    for part in filter(None, path.split(".")):
        if isinstance(module, nn.ModuleList | nn.Sequential) and part.lstrip("-").isdigit():
            index = int(part)
            module = module[index] if -len(module) <= index < len(module) else None
        else:
            module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _require(block: nn.Module, path: str) -> nn.Module:
    module = _resolve(block, path)
    if module is None:
        raise UnsupportedArchitectureError(f"{type(block).__name__} has no submodule {path!r}.")
    return module


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else None if value is None else list(value)
