"""Transcoders: sparse, wide replacements of a model's MLPs (Dunefsky et al. 2024; Ameisen
et al. 2025, "Circuit Tracing").

A transcoder for layer l reads the MLP's input ``x_l`` (hook point ``{stack}.{l}.mlp_in``:
the normed residual the MLP sees) and predicts its output ``y_l`` (``{stack}.{l}.mlp_out``)
through features:

    pre_l  = x_l @ W_enc[l] + b_enc[l]                    (F features)
    a_l    = act(pre_l)                                    JumpReLU or TopK
    y_l^   = a_l @ W_dec[l] + b_dec[l]                     per-layer transcoder ("plt")
           + x_l @ W_skip[l]                               skip transcoder ("skip")
    y_l^   = sum_{s <= l} a_s @ W_dec[s][l - s] + b_dec[l]  cross-layer transcoder ("clt"):
                                                           features of layer s write to
                                                           every later MLP output

Shapes follow the maths: ``W_enc`` (d_model, F), ``W_dec`` (F, d_model) or, for a CLT,
(F, n_layers - s, d_model); ``W_skip`` (d_model, d_model). Input and output are scaled by
fixed per-layer factors (``input_scale``, ``output_scale``, estimated once from data so that
inputs have norm sqrt(d_model)); ``folded()`` returns weights with the scales multiplied
in, which is what the circuit-tracer format and the attribution graph use.

JumpReLU: ``a = pre * (pre > threshold)``, the threshold kept in fp32 and trained directly
with a straight-through estimator (rectangle kernel of width ``bandwidth``), as in
Rajamanoharan et al. 2024. TopK keeps the k largest positive pre-activations per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

TranscoderKind = Literal["plt", "skip", "clt"]
ActivationKind = Literal["jumprelu", "topk"]
KINDS: tuple[TranscoderKind, ...] = ("plt", "skip", "clt")
ACTIVATIONS: tuple[ActivationKind, ...] = ("jumprelu", "topk")


# Hub ids of bundled models: circuit-tracer's files name a model by its hub id.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class TranscoderMismatchError(ValueError):
    """Transcoders made for another model: its name, width, depth, stack or hook points
    differ (one class for the loaders, attribution and dashboards)."""


class TranscoderConfigError(ValueError):
    """A transcoder configuration that cannot be built (with what is wrong)."""


@dataclass(frozen=True)
class TranscoderConfig:
    model_name: str
    kind: TranscoderKind
    d_model: int
    n_features: int
    layers: tuple[int, ...]  # the model layers replaced, increasing (a CLT: all of 0..L-1)
    n_model_layers: int
    activation: ActivationKind = "jumprelu"
    top_k: int = 32  # TopK only
    bandwidth: float = 0.1  # JumpReLU's straight-through kernel width
    initial_threshold: float = 0.1
    stack: str = "decoder"
    input_site: str = "mlp_in"
    output_site: str = "mlp_out"
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained (provenance)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TranscoderConfigError(
                f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}."
            )
        if self.activation not in ACTIVATIONS:
            raise TranscoderConfigError(
                f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}."
            )
        if self.d_model < 1 or self.n_features < 1:
            raise TranscoderConfigError("d_model and n_features must be at least 1.")
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise TranscoderConfigError(
                f"layers must be increasing and distinct; got {self.layers}."
            )
        if self.layers[0] < 0 or self.layers[-1] >= self.n_model_layers:
            raise TranscoderConfigError(
                f"layers must lie in 0..{self.n_model_layers - 1}; got {list(self.layers)}."
            )
        if self.kind == "clt" and list(self.layers) != list(
            range(self.layers[0], self.layers[-1] + 1)
        ):
            raise TranscoderConfigError("A cross-layer transcoder needs consecutive layers.")
        if self.activation == "topk" and not 1 <= self.top_k <= self.n_features:
            raise TranscoderConfigError(
                f"top_k must lie in 1..{self.n_features}; got {self.top_k}."
            )
        if self.bandwidth <= 0:
            raise TranscoderConfigError("bandwidth must be positive.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["layers"] = tuple(int(i) for i in values["layers"])
        return cls(**values)

    def hook_in(self, layer: int) -> str:
        return f"{self.stack}.{layer}.{self.input_site}"

    def hook_out(self, layer: int) -> str:
        return f"{self.stack}.{layer}.{self.output_site}"


# -- activations ------------------------------------------------------------------------------


class _JumpReLUFunction(torch.autograd.Function):
    """``pre * (pre > threshold)``; the threshold's gradient through a rectangle kernel."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        # Compared in fp32 (the threshold's precision) whatever the input's dtype; where()
        # rather than a product, so that inactive features are +0.0, never -0.0.
        return torch.where(pre.float() > threshold, pre, torch.zeros_like(pre))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_pre = grad * (pre.float() > threshold)
        # d/d(threshold) of pre * H(pre - threshold) = -threshold * delta(pre - threshold),
        # delta approximated by a rectangle of width ``bandwidth`` around the threshold.
        near = ((pre.float() - threshold).abs() < bandwidth / 2).float()
        grad_threshold = -(threshold / bandwidth) * near * grad.float()
        dims = tuple(range(grad_threshold.dim() - threshold.dim()))
        return grad_pre, grad_threshold.sum(dim=dims).to(threshold.dtype), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    out = _JumpReLUFunction.apply(pre, threshold.float(), bandwidth)
    assert isinstance(out, Tensor)
    return out


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """The ``k`` largest positive pre-activations of each row; the rest 0."""
    values, indices = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


# -- the module -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldedLayer:
    """One layer's weights with the input and output scales multiplied in (what the
    circuit-tracer format stores and attribution reads): ``pre = x @ W_enc + b_enc``,
    ``y = sum a_s @ W_dec_s + b_dec (+ x @ W_skip)`` in the model's own units."""

    W_enc: Tensor  # (d_model, F)
    b_enc: Tensor  # (F,)
    threshold: Tensor  # (F,) JumpReLU (inf-free; 0 for TopK)
    W_dec: Tensor  # (F, d_model), or (F, n_later, d_model) for a CLT
    b_dec: Tensor  # (d_model,)
    W_skip: Tensor | None  # (d_model, d_model)


class TranscoderSet(nn.Module):
    """Transcoders for ``config.layers`` of one model (see the module docstring)."""

    input_scale: Tensor
    output_scale: Tensor

    def __init__(self, config: TranscoderConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        d, f = config.d_model, config.n_features
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.W_enc = nn.ParameterList()
        self.b_enc = nn.ParameterList()
        self.threshold = nn.ParameterList()
        self.W_dec = nn.ParameterList()
        self.b_dec = nn.ParameterList()
        self.W_skip = nn.ParameterList()
        for index, _layer in enumerate(config.layers):
            # Decoder rows of norm ~0.1 and the encoder as its transpose: the usual start.
            shape = (f, self._n_outputs(index), d) if config.kind == "clt" else (f, d)
            w_dec = torch.randn(*shape, generator=generator) / math.sqrt(d)
            w_dec = w_dec * (0.1 / w_dec.flatten(1).norm(dim=-1).clamp_min(1e-8)).view(
                f, *([1] * (w_dec.dim() - 1))
            )
            first_out = w_dec[:, 0] if config.kind == "clt" else w_dec
            self.W_enc.append(nn.Parameter(first_out.T.clone().contiguous()))
            self.b_enc.append(nn.Parameter(torch.zeros(f)))
            self.threshold.append(
                nn.Parameter(torch.full((f,), config.initial_threshold, dtype=torch.float32))
            )
            self.W_dec.append(nn.Parameter(w_dec.contiguous()))
            self.b_dec.append(nn.Parameter(torch.zeros(d)))
            if config.kind == "skip":
                self.W_skip.append(nn.Parameter(torch.zeros(d, d)))
        self.register_buffer("input_scale", torch.ones(len(config.layers)))
        self.register_buffer("output_scale", torch.ones(len(config.layers)))

    # -- layout ---------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    def index(self, layer: int) -> int:
        """Position of model layer ``layer`` in ``layers``."""
        try:
            return self.config.layers.index(layer)
        except ValueError:
            raise KeyError(
                f"No transcoder for layer {layer}; these cover layers {list(self.config.layers)}."
            ) from None

    def _n_outputs(self, index: int) -> int:
        return len(self.config.layers) - index

    # -- the maps -------------------------------------------------------------------------
    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Pre-activations (..., F) of layer ``layer``'s features for MLP inputs ``x``."""
        i = self.index(layer)
        weight = self.W_enc[i]
        # A bf16/fp16 model's activations meet the transcoder in its own dtype.
        return (x.to(weight.dtype) * self.input_scale[i]) @ weight + self.b_enc[i]

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        if self.config.activation == "topk":
            return topk_activation(pre, self.config.top_k)
        return jumprelu(pre, self.threshold[self.index(layer)], self.config.bandwidth)

    def decode(self, layer: int, acts: dict[int, Tensor], x: Tensor | None = None) -> Tensor:
        """Layer ``layer``'s predicted MLP output from the features of ``acts`` (by model
        layer; a CLT reads every earlier layer's), plus the skip path of ``x`` if any."""
        i = self.index(layer)
        if self.config.kind == "clt":
            out = sum(
                acts[source] @ self.W_dec[s][:, i - s]
                for s, source in enumerate(self.config.layers[: i + 1])
            )
        else:
            out = acts[layer] @ self.W_dec[i]
        out = out + self.b_dec[i]
        if self.config.kind == "skip":
            if x is None:
                raise ValueError("A skip transcoder's decode needs the MLP input x.")
            out = out + (x * self.input_scale[i]) @ self.W_skip[i]
        return out / self.output_scale[i]

    def forward(self, inputs: dict[int, Tensor]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """``inputs``: MLP inputs by model layer (every layer of ``layers``). Returns the
        predicted MLP outputs and the feature activations, by model layer."""
        acts = {
            layer: self.activate(layer, self.encode(layer, inputs[layer])) for layer in self.layers
        }
        outputs = {layer: self.decode(layer, acts, inputs[layer]) for layer in self.layers}
        return outputs, acts

    # -- facts ----------------------------------------------------------------------------
    def decoder_norms(self, layer: int) -> Tensor:
        """(F,) the norm of each feature's decoder vector(s), in scaled units (what the
        sparsity penalty weighs): a CLT's over all the layers it writes to."""
        return self.W_dec[self.index(layer)].flatten(1).norm(dim=-1)

    @torch.no_grad()
    def folded(self, layer: int) -> FoldedLayer:
        """Layer ``layer``'s weights with the scales multiplied in (model units)."""
        i = self.index(layer)
        s_in = self.input_scale[i]
        w_dec = self.W_dec[i].detach().clone()
        if self.config.kind == "clt":
            scales = self.output_scale[i:].view(1, -1, 1)
            w_dec = w_dec / scales
            b_dec = self.b_dec[i] / self.output_scale[i]
        else:
            w_dec = w_dec / self.output_scale[i]
            b_dec = self.b_dec[i] / self.output_scale[i]
        skip = None
        if self.config.kind == "skip":
            skip = self.W_skip[i].detach() * s_in / self.output_scale[i]
        threshold = (
            self.threshold[i].detach().float()
            if self.config.activation == "jumprelu"
            else torch.zeros(self.config.n_features)
        )
        return FoldedLayer(
            W_enc=self.W_enc[i].detach() * s_in,
            b_enc=self.b_enc[i].detach().clone(),
            threshold=threshold,
            W_dec=w_dec,
            b_dec=b_dec.detach().clone(),
            W_skip=skip,
        )

    @torch.no_grad()
    def set_scales(self, input_norms: dict[int, float], output_norms: dict[int, float]) -> None:
        """Scale each layer so inputs and outputs have norm sqrt(d_model) on average, given
        their measured mean norms."""
        target = math.sqrt(self.config.d_model)
        for layer in self.layers:
            i = self.index(layer)
            self.input_scale[i] = target / max(input_norms[layer], 1e-8)
            self.output_scale[i] = target / max(output_norms[layer], 1e-8)
