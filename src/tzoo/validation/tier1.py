"""Tier 1: the checks every language model should pass before anything else is asked of it.

Shapes, batch and padding invariance, causality, determinism, finite outputs, half-precision
parity, gradient flow, initialisation, memory, latency and save/load parity. Each works
through ``Subject`` (so any model, whatever it returns) and measures one number against one
threshold; checks that train or change dtype work on deep copies, never on the model itself.

Thresholds (``ValidationOptions`` and its ``extra`` keys):

- equalities in float32 (batch, padding, causality, save/load): max abs logit diff <= ``atol``;
- determinism: bit-identical passes, within ``atol`` warns, beyond fails;
- half precision: max abs diff / max abs fp32 logit <= ``extra["half_precision_tolerance"]``
  (default bf16 0.1, fp16 0.02: about 25 and 40 times their unit roundoff, room for error
  growing through the layers); any NaN or Inf in half precision fails;
- initialisation: weight std x sqrt(fan-in) within ``extra["init_std_ratio_fail"]``
  (0.01, 10) else fail, within ``extra["init_std_ratio_warn"]`` (0.03, 4) else warn;
- memory: warn above ``extra["memory_budget_mb"]`` (default none);
- latency: warn when p95 is above ``extra["latency_budget_ms"]`` (default none);
- nan_inf's longest input is capped at ``extra["max_test_length"]`` (default 4096).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tzoo.validation.registry import CheckContext, Outcome, SkipCheck, register
from tzoo.validation.report import Status
from tzoo.validation.subject import Subject, unwrap_logits

HALF_TOLERANCE = {"bfloat16": 0.1, "float16": 0.02}
INIT_RATIO_FAIL = (0.01, 10.0)
INIT_RATIO_WARN = (0.03, 4.0)
EMBEDDING_STD_FAIL = (1e-4, 10.0)  # nn.Embedding's default is N(0, 1); GPT-2's 0.02
MAX_TEST_LENGTH = 4096
_MB = 2**20


# -- shared helpers ------------------------------------------------------------------------------


def _forward(
    subject: Subject,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    model: nn.Module | None = None,
    decoder_input_ids: Tensor | None = None,
    **extra: Any,
) -> Tensor:
    """Float32 logits without autograd (``extra`` goes to the model, e.g. position_ids)."""
    with torch.no_grad():
        output = subject.call(
            input_ids,
            attention_mask,
            decoder_input_ids=decoder_input_ids,
            model=model,
            **extra,
        )
    return unwrap_logits(output).float()


def _max_diff(a: Tensor, b: Tensor) -> float:
    """Max abs difference; inf when shapes differ or either side is not finite (a NaN is
    never equal to anything, and inf - inf would read as NaN, not as a difference)."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    diff = (a.float() - b.float()).abs()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return float(diff.max())


def _ones(ids: Tensor) -> Tensor:
    return torch.ones_like(ids)


def _representative(ctx: CheckContext) -> tuple[int, int]:
    """The (batch, length) most checks run at: the middle of the sweep, at least 2 rows."""
    opts = ctx.options
    batches = sorted(set(opts.batch_sizes)) or [2]
    lengths = sorted(set(opts.seq_lengths)) or [16]
    batch = max(2, batches[len(batches) // 2])
    return batch, ctx.subject.longest(lengths[len(lengths) // 2])


def _lengths(ctx: CheckContext) -> list[int]:
    return sorted({ctx.subject.longest(t) for t in ctx.options.seq_lengths})


def _takes_explicitly(forward: Callable[..., Any], name: str) -> bool:
    """Whether ``forward`` names ``name`` (a bare ``**kwargs`` may silently drop it)."""
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _hidden_size(config: Any) -> int | None:
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _expected_width(subject: Subject, output: Any) -> tuple[int, str]:
    """The last dimension the output should have: the vocabulary; for a headless Hugging
    Face model (``BertModel``: a last hidden state and no logits) its hidden size."""
    has_logits = isinstance(getattr(output, "logits", None), Tensor)
    hidden = getattr(output, "last_hidden_state", None)
    if not has_logits and isinstance(hidden, Tensor):
        size = _hidden_size(getattr(subject.model, "config", None))
        if size is not None:
            return size, "hidden size (a model with no LM head returns its last hidden state)"
    return subject.vocab_size, "vocabulary size"


def _other_token(ids: Tensor, subject: Subject, generator: torch.Generator) -> Tensor:
    """A token different from each of ``ids``, above the pad id (as ``random_ids`` draws)."""
    floor = min((subject.pad_token_id or 0) + 1, subject.vocab_size - 2)
    span = subject.vocab_size - floor
    shift = torch.randint(1, max(2, span), ids.shape, generator=generator).to(ids.device)
    return (ids - floor + shift) % span + floor


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


# -- shape sweep ----------------------------------------------------------------------------------


@register("shape_sweep", tier=1)
def shape_sweep(ctx: CheckContext) -> Outcome:
    """Logits are (batch, length, vocab) at every batch size and length, up to the model's longest input."""
    subject = ctx.subject
    lengths = _lengths(ctx)
    capped = sorted({t for t in ctx.options.seq_lengths if subject.longest(t) != t})
    sizes: list[dict[str, Any]] = []
    broken: list[str] = []
    width: tuple[int, str] | None = None
    for batch in ctx.options.batch_sizes:
        for length in lengths:
            ids = subject.random_ids(batch, length, ctx.generator(batch * 100_003 + length))
            row: dict[str, Any] = {"batch": batch, "length": length}
            try:
                with torch.no_grad():
                    output = subject.call(ids, _ones(ids))
                shape = tuple(unwrap_logits(output).shape)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"[:300]
                broken.append(f"B={batch}, T={length}: {row['error']}")
                sizes.append(row)
                continue
            if width is None:
                width = _expected_width(subject, output)
            expected = (batch, length, width[0])
            row.update(shape=list(shape), expected=list(expected))
            if shape != expected:
                broken.append(f"B={batch}, T={length}: got {shape}, expected {expected}")
            sizes.append(row)
    details: dict[str, Any] = {"sizes": sizes, "last_dimension": width[1] if width else None}
    if capped:
        details["lengths_capped"] = f"{capped} capped at the model's longest, {subject.max_length}"
    total = len(sizes)
    if broken:
        return Outcome(
            "fail",
            len(broken),
            0,
            f"{len(broken)} of {total} sizes broke: " + "; ".join(broken[:4]),
            details,
        )
    last = f"{width[0]}): the last dimension is the {width[1]}" if width else "V)"
    return Outcome(
        "pass",
        0,
        0,
        f"All {total} sizes (batch {list(ctx.options.batch_sizes)} x length {lengths}) gave "
        f"(B, T, {last}.",
        details,
    )


# -- batch equivalence -----------------------------------------------------------------------------


@register("batch_equivalence", tier=1)
def batch_equivalence(ctx: CheckContext) -> Outcome:
    """Each row's logits are the same alone as in a batch, and in any batch order."""
    subject, atol = ctx.subject, ctx.options.atol
    batch, length = _representative(ctx)
    ids = ctx.ids(batch, length, offset=1)
    together = _forward(subject, ids, _ones(ids))
    rows: dict[str, float] = {}
    for row in range(batch):
        alone = _forward(subject, ids[row : row + 1], _ones(ids[row : row + 1]))
        rows[f"row {row} alone"] = _max_diff(alone, together[row : row + 1])
    flipped = _forward(subject, ids.flip(0), _ones(ids))
    rows["batch reversed"] = _max_diff(flipped.flip(0), together)
    worst_name, worst = max(rows.items(), key=lambda item: item[1])
    details = {"batch": batch, "length": length, "max_abs_diff": rows}
    if worst > atol:
        return Outcome(
            "fail",
            worst,
            atol,
            f"Logits depend on the batch's other rows: {worst_name} differs by {_fmt(worst)} "
            f"(> {atol:g}); something mixes rows (normalising over the batch, BatchNorm, a "
            "shared buffer).",
            details,
        )
    return Outcome(
        "pass",
        worst,
        atol,
        f"Each of {batch} rows gives the same logits alone and in the batch (max diff "
        f"{_fmt(worst)}).",
        details,
    )


# -- padding invariance ----------------------------------------------------------------------------


@register("padding_invariance", tier=1)
def padding_invariance(ctx: CheckContext) -> Outcome:
    """Padding under an attention mask leaves the real positions' logits unchanged."""
    subject, atol = ctx.subject, ctx.options.atol
    if not subject.takes_attention_mask:
        raise SkipCheck("forward takes no attention_mask, so padding cannot be masked.")
    batch, length = _representative(ctx)
    pad_count = max(2, length // 4)
    if subject.max_length is not None and length + pad_count > subject.max_length:
        length = subject.max_length - pad_count
    if length < 1:
        raise SkipCheck(f"The model's longest input ({subject.max_length}) leaves no room to pad.")
    ids = ctx.ids(batch, length, offset=2)
    pad_id = subject.pad_token_id or 0
    pads = ids.new_full((batch, pad_count), pad_id)
    noise = subject.random_ids(batch, pad_count, ctx.generator(3))
    real = torch.ones_like(ids)
    hidden = torch.zeros_like(pads)
    # An encoder-decoder's padding is on the encoder side; its decoder reads the same tokens
    # in every run, and every decoder position is "real".
    decoder_ids = subject.decoder_inputs(ids) if subject.kind == "encoder-decoder" else None
    seq2seq = decoder_ids is not None

    def run(input_ids: Tensor, mask: Tensor, **extra: Any) -> Tensor:
        return _forward(subject, input_ids, mask, decoder_input_ids=decoder_ids, **extra)

    def real_part(logits: Tensor, side: str) -> Tensor:
        if seq2seq:
            return logits
        return logits[:, :length] if side == "right" else logits[:, pad_count:]

    reference = run(ids, real)
    right_mask = torch.cat([real, hidden], dim=1)
    left_mask = torch.cat([hidden, real], dim=1)
    tests: dict[str, dict[str, Any]] = {}
    right = real_part(run(torch.cat([ids, pads], dim=1), right_mask), "right")
    tests["right padding vs none"] = {"max_abs_diff": _max_diff(right, reference), "held": True}
    # Left padding with other tokens under the mask: positions are the same in both runs,
    # so only masked tokens leaking into real positions can differ (whatever the model's
    # position scheme).
    left = real_part(run(torch.cat([pads, ids], dim=1), left_mask), "left")
    left_noise = real_part(run(torch.cat([noise, ids], dim=1), left_mask), "left")
    tests["left padding: masked tokens changed"] = {
        "max_abs_diff": _max_diff(left, left_noise),
        "held": True,
    }
    # Left padding vs none also shifts absolute positions: held against the model only when
    # forward takes position_ids (then counted from the first real token, as generation
    # does); otherwise reported as whether the model supports left padding.
    takes_positions = not seq2seq and _takes_explicitly(subject.model.forward, "position_ids")
    if takes_positions:
        positions = (left_mask.cumsum(-1) - 1).clamp(min=0)
        left = real_part(
            run(torch.cat([pads, ids], dim=1), left_mask, position_ids=positions), "left"
        )
    diff = _max_diff(left, reference)
    tests["left padding vs none"] = {
        "max_abs_diff": diff,
        "held": takes_positions,
        "supported": diff <= atol,
    }
    held = {name: t["max_abs_diff"] for name, t in tests.items() if t["held"]}
    worst_name, worst = max(held.items(), key=lambda item: item[1])
    details = {"batch": batch, "length": length, "pad_count": pad_count, "tests": tests}
    if worst > atol:
        return Outcome(
            "fail",
            worst,
            atol,
            f"Padding changes the real positions' logits: {worst_name} differs by "
            f"{_fmt(worst)} (> {atol:g}); masked positions are attended to, or the mask is "
            "ignored.",
            details,
        )
    note = ""
    if not takes_positions:
        supported = "supports" if diff <= atol else "does not support"
        note = f" Left padding vs none: {_fmt(diff)} (it {supported} left padding; forward "
        note += "takes no position_ids, so not held against it)."
    return Outcome(
        "pass",
        worst,
        atol,
        f"{pad_count} pad tokens under the mask leave the real positions' logits unchanged "
        f"(max diff {_fmt(worst)}).{note}",
        details,
    )


# -- causality --------------------------------------------------------------------------------------


@register("causality", tier=1)
def causality(ctx: CheckContext) -> Outcome:
    """Changing token t leaves the logits before t unchanged and changes those at and after t."""
    subject, atol = ctx.subject, ctx.options.atol
    if subject.kind == "encoder":
        raise SkipCheck("An encoder is bidirectional: every position may see every token.")
    batch, length = _representative(ctx)
    if length < 2:
        raise SkipCheck("Causality needs inputs of at least 2 tokens.")
    ids = ctx.ids(batch, length, offset=4)
    seq2seq = subject.kind == "encoder-decoder"
    # An encoder-decoder's causality is its decoder's: only decoder_input_ids change.
    tokens = subject.decoder_inputs(ids) if seq2seq else ids
    reference = _forward(subject, ids, _ones(ids), decoder_input_ids=tokens if seq2seq else None)
    generator = ctx.generator(5)
    points = sorted({1, length // 3, (2 * length) // 3, length - 1} - {0})
    per_t: dict[str, dict[str, Any]] = {}
    for t in points:
        changed = tokens.clone()
        changed[:, t] = _other_token(tokens[:, t], subject, generator)
        if seq2seq:
            logits = _forward(subject, ids, _ones(ids), decoder_input_ids=changed)
        else:
            logits = _forward(subject, changed, _ones(changed))
        if logits.shape != reference.shape:
            raise RuntimeError(f"Logits of shape {tuple(logits.shape)} after changing token {t}.")
        diff = (logits - reference).abs().amax(dim=(0, 2))  # per position
        diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, math.inf))
        leaking = [int(p) for p in torch.nonzero(diff[:t] > atol).flatten()]
        per_t[str(t)] = {
            "leak": float(diff[:t].max()),
            "effect": float(diff[t:].max()),
            "leaking_positions": leaking[:10],
        }
    leak = max(v["leak"] for v in per_t.values())
    details = {"batch": batch, "length": length, "changed_positions": points, "per_token": per_t}
    side = "decoder " if seq2seq else ""
    if leak > atol:
        at, worst = max(per_t.items(), key=lambda item: item[1]["leak"])
        return Outcome(
            "fail",
            leak,
            atol,
            f"Causal leak: changing {side}token {at} changes the logits at earlier positions "
            f"{worst['leaking_positions']} by up to {_fmt(leak)} (> {atol:g}): the mask lets "
            'positions see the future (or it is an encoder: say "causal": false in its config).',
            details,
        )
    dead = [t for t, v in per_t.items() if v["effect"] <= atol]
    if dead:
        return Outcome(
            "fail",
            leak,
            atol,
            f"Changing {side}token(s) {', '.join(dead)} changed no logits at or after them: "
            "the model ignores its input there.",
            details,
        )
    return Outcome(
        "pass",
        leak,
        atol,
        f"Changing {side}tokens {points} leaves earlier logits unchanged (max leak "
        f"{_fmt(leak)}) and changes later ones.",
        details,
    )


# -- determinism ------------------------------------------------------------------------------------


@register("determinism", tier=1)
def determinism(ctx: CheckContext) -> Outcome:
    """Two eval-mode runs on the same input give bit-identical logits."""
    subject, atol = ctx.subject, ctx.options.atol
    batch, length = _representative(ctx)
    ids = ctx.ids(batch, length, offset=6)
    first = _forward(subject, ids, _ones(ids))
    # No reseeding in between: eval-mode randomness (dropout left on) must show.
    second = _forward(subject, ids, _ones(ids))
    diff = _max_diff(first, second)
    details = {"batch": batch, "length": length, "training_mode": subject.model.training}
    if diff == 0.0:
        return Outcome("pass", diff, 0.0, "Two runs gave bit-identical logits.", details)
    if diff <= atol:
        return Outcome(
            "warn",
            diff,
            0.0,
            f"Two runs differ by {_fmt(diff)}: within atol {atol:g}, but not bit-identical "
            "(non-deterministic kernels?).",
            details,
        )
    return Outcome(
        "fail",
        diff,
        0.0,
        f"Two eval-mode runs differ by {_fmt(diff)} (> atol {atol:g}): randomness in eval mode "
        "(dropout called with training=True?).",
        details,
    )


# -- NaN / Inf --------------------------------------------------------------------------------------


def _non_finite(logits: Tensor) -> dict[str, Any] | None:
    """Where ``logits`` is NaN or infinite (None when it is all finite)."""
    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return None
    rows = bad.flatten(2).any(-1) if logits.dim() >= 3 else bad
    where = torch.nonzero(rows)[:10].tolist()
    return {
        "nan": int(torch.isnan(logits).sum()),
        "posinf": int(torch.isposinf(logits).sum()),
        "neginf": int(torch.isneginf(logits).sum()),
        "of": logits.numel(),
        "first_positions": where,  # (batch, position) pairs
    }


@register("nan_inf", tier=1)
def nan_inf(ctx: CheckContext) -> Outcome:
    """No NaN or Inf in the logits on random inputs and on extreme but valid ones."""
    subject = ctx.subject
    batch, length = _representative(ctx)
    cap = int(ctx.options.extra.get("max_test_length", MAX_TEST_LENGTH))
    longest = min(subject.max_length or max(ctx.options.seq_lengths), cap)
    high, low = subject.vocab_size - 1, (subject.pad_token_id or 0) + 1
    inputs = {
        f"random {batch}x{length}": ctx.ids(batch, length, offset=7),
        f"random at the longest length, {longest}": ctx.ids(1, longest, offset=8),
        f"token {high} repeated {longest} times": torch.full(
            (1, longest), high, device=subject.device
        ),
        f"token {low} repeated {longest} times": torch.full(
            (1, longest), min(low, high), device=subject.device
        ),
    }
    found: dict[str, Any] = {}
    for name, ids in inputs.items():
        problem = _non_finite(_forward(subject, ids, _ones(ids)))
        found[name] = problem or "all finite"
        if problem is not None:
            ctx.note(f"non-finite logits on {name}")
    bad = {name: v for name, v in found.items() if v != "all finite"}
    details = {"inputs": found}
    if bad:
        count = sum(v["nan"] + v["posinf"] + v["neginf"] for v in bad.values())
        name, first = next(iter(bad.items()))
        return Outcome(
            "fail",
            count,
            0,
            f"{count} non-finite logits on {len(bad)} of {len(inputs)} inputs; first on "
            f"{name} at (batch, position) {first['first_positions'][:3]}.",
            details,
        )
    return Outcome(
        "pass",
        0,
        0,
        f"All logits finite on {len(inputs)} inputs, up to length {longest}.",
        details,
    )


# -- half precision ---------------------------------------------------------------------------------

_UNSUPPORTED = ("not implemented for", "not supported", "unsupported", "no kernel")


@register("half_precision", tier=1)
def half_precision(ctx: CheckContext) -> Outcome:
    """bf16 and fp16 logits match fp32 relative to the logit scale, with no NaN or Inf."""
    subject = ctx.subject
    tolerance = {**HALF_TOLERANCE, **ctx.options.extra.get("half_precision_tolerance", {})}
    batch, length = _representative(ctx)
    ids = ctx.ids(batch, length, offset=9)
    reference = _forward(subject, ids, _ones(ids))
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    if not math.isfinite(scale):
        raise SkipCheck("The fp32 logits are not finite already (see nan_inf).")
    top1 = reference.argmax(-1)
    # Positions whose fp32 winner leads by more than the half-precision error must keep it.
    top2 = reference.topk(min(2, reference.shape[-1]), dim=-1).values
    margin = top2[..., 0] - top2[..., -1]
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        try:
            logits = _forward(
                subject, ids, _ones(ids), model=copy.deepcopy(subject.model).to(dtype).eval()
            )
        except Exception as error:
            text = f"{type(error).__name__}: {error}"[:300]
            # A kernel missing for this dtype on this device is a skip; anything else (a
            # float32 tensor built inside forward, say) is the model's fault.
            if any(marker in str(error).lower() for marker in _UNSUPPORTED):
                results[name] = {"unsupported": text}
            else:
                results[name] = {"error": text}
                failures.append(f"{name} crashed: {text}")
            continue
        problem = _non_finite(logits)
        if problem is not None:
            results[name] = {"non_finite": problem, "tolerance": tolerance[name]}
            failures.append(
                f"{name}: {problem['nan']} NaN, {problem['posinf'] + problem['neginf']} Inf "
                f"(first at {problem['first_positions'][:2]})"
            )
            continue
        diff = float((logits - reference).abs().max())
        relative = diff / max(scale, 1e-12)
        decisive = margin > 2 * diff
        agree = (logits.argmax(-1) == top1)[decisive]
        results[name] = {
            "relative_error": relative,
            "max_abs_diff": diff,
            "tolerance": tolerance[name],
            "top1_agreement": float((logits.argmax(-1) == top1).float().mean()),
            "top1_agreement_decisive": float(agree.float().mean()) if agree.numel() else None,
        }
        if relative > tolerance[name]:
            failures.append(f"{name}: relative error {relative:.3g} > {tolerance[name]:g}")
    measured = {k: v["relative_error"] for k, v in results.items() if "relative_error" in v}
    details = {"logit_scale": scale, "dtypes": results, "device": str(subject.device)}
    if not measured and not failures:
        reasons = "; ".join(f"{k}: {v['unsupported']}" for k, v in results.items())
        raise SkipCheck(f"Neither bf16 nor fp16 runs here: {reasons}")
    if failures:
        return Outcome(
            "fail", measured or None, tolerance, "Half precision: " + "; ".join(failures), details
        )
    skipped = [k for k, v in results.items() if "unsupported" in v]
    parts = [f"{k} {v:.3g}" for k, v in measured.items()]
    note = f" ({', '.join(skipped)} unsupported here)" if skipped else ""
    return Outcome(
        "pass",
        measured,
        tolerance,
        f"Half-precision logits within tolerance of fp32 (max abs diff / max abs logit: "
        f"{', '.join(parts)}){note}.",
        details,
    )


# -- gradient flow ----------------------------------------------------------------------------------


def _other_outputs(output: Any, logits: Tensor) -> list[Tensor]:
    """The model's other floating tensors at the top level of its output (BERT's pooler
    output, T5's encoder state): parameters feeding only those still count as used."""
    if isinstance(output, Tensor):
        return []
    if isinstance(output, Mapping):
        values: Sequence[Any] = list(output.values())
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        values = list(output)
    else:
        return []
    return [
        v
        for v in values
        if isinstance(v, Tensor) and v is not logits and v.is_floating_point() and v.requires_grad
    ]


def training_loss(subject: Subject, model: nn.Module, ids: Tensor) -> Tensor:
    """A language-modelling loss of ``model`` on ``ids``: next-token cross-entropy for a
    decoder, reconstruction for an encoder and for an encoder-decoder's decoder (which reads
    the input shifted right); mean square for a headless model; plus the mean square of the
    model's other outputs."""
    output = subject.call(ids, _ones(ids), model=model)
    logits = unwrap_logits(output)
    if logits.dim() == 3 and logits.shape[-1] == subject.vocab_size:
        if subject.kind == "decoder" and ids.shape[1] > 1:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    else:
        loss = logits.float().pow(2).mean()
    for extra in _other_outputs(output, logits):
        loss = loss + extra.float().pow(2).mean()
    return loss


@register("gradient_flow", tier=1)
def gradient_flow(ctx: CheckContext) -> Outcome:
    """Every trainable parameter gets a finite non-zero gradient, and an Adam step changes it."""
    subject = ctx.subject
    model = copy.deepcopy(subject.model).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise SkipCheck("The model has no trainable parameters.")
    batch, length = _representative(ctx)
    ids = ctx.ids(batch, length, offset=10)
    before = {n: p.detach().clone() for n, p in named}
    optimiser = torch.optim.Adam([p for _, p in named], lr=1e-3)
    got_gradient: set[str] = set()
    non_finite: dict[str, int] = {}
    norms: dict[str, float] = {}
    losses: list[float] = []
    # Two steps: a parameter behind a zero-initialised one (LoRA's A behind B = 0) gets its
    # first gradient only after the step; one that never gets any is the bug.
    for step in range(2):
        optimiser.zero_grad(set_to_none=True)
        loss = training_loss(subject, model, ids)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            return Outcome(
                "fail",
                None,
                0,
                f"The training loss is {losses[-1]} at step {step}.",
                {"losses": losses},
            )
        loss.backward()
        for name, parameter in named:
            grad = parameter.grad
            if grad is None:
                continue
            if not bool(torch.isfinite(grad).all()):
                non_finite.setdefault(name, step)
            elif bool(grad.count_nonzero() > 0):
                got_gradient.add(name)
                norms.setdefault(name, float(grad.norm()))
        optimiser.step()
    none = [n for n, p in named if n not in got_gradient and n not in non_finite]
    unchanged = [
        n
        for n, p in named
        if n not in none and n not in non_finite and torch.equal(before[n], p.detach())
    ]
    problems = {
        **{n: "no gradient (not in the loss's graph, or detached)" for n in none},
        **{n: f"non-finite gradient at step {s}" for n, s in non_finite.items()},
        **{n: "unchanged by the Adam step" for n in unchanged},
    }
    details = {
        "trainable_parameters": len(named),
        "losses": losses,
        "problems": problems,
        "gradient_norms": dict(list(norms.items())[:500]),
    }
    if problems:
        listed = ", ".join(f"{n} ({why})" for n, why in list(problems.items())[:8])
        more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
        return Outcome(
            "fail",
            len(problems),
            0,
            f"{len(problems)} of {len(named)} trainable parameters never learn: {listed}{more}.",
            details,
        )
    return Outcome(
        "pass",
        0,
        0,
        f"All {len(named)} trainable parameters got finite non-zero gradients and changed "
        "after an Adam step.",
        details,
    )


# -- initialisation ---------------------------------------------------------------------------------


_EMBEDDING_NAMES = ("emb", "pos", "token", "wte", "wpe")


def _parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Each parameter's kind: norm (of a module whose class name has "Norm"), embedding (of
    an nn.Embedding, or a bare parameter named like one: minGPT's ``pos_emb`` starts at
    zeros, ViT's ``cls_token`` too), or none (then judged by its shape)."""
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        norm = "norm" in type(module).__name__.lower()
        layer = isinstance(module, (nn.Linear, nn.Embedding, nn.MultiheadAttention))
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if norm:
                kinds[full] = "norm"
            elif isinstance(module, nn.Embedding) or (
                not layer and any(part in name.lower() for part in _EMBEDDING_NAMES)
            ):
                kinds[full] = "embedding"
    return kinds


_TORCH_LAYOUT = (nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fan_ins(parameter: Tensor, owner: nn.Module | None) -> list[int]:
    """The fan-in(s) a weight may have: PyTorch's layers store (out, in, ...); Hugging
    Face's Conv1D (GPT-2) stores (in, out); a bare matrix may be used either way round."""
    if owner is not None and type(owner).__name__ == "Conv1D":
        return [int(parameter.shape[0])]
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(parameter)
    if parameter.dim() == 2 and not isinstance(owner, _TORCH_LAYOUT):
        return [int(fan_in), int(parameter.shape[0])]
    return [int(fan_in)]


@register("initialisation", tier=1)
def initialisation(ctx: CheckContext) -> Outcome:
    """Weight statistics are sane: no NaN, no all-zero matrix, std near 1/sqrt(fan-in)."""
    model = ctx.subject.model
    fail_band = tuple(ctx.options.extra.get("init_std_ratio_fail", INIT_RATIO_FAIL))
    warn_band = tuple(ctx.options.extra.get("init_std_ratio_warn", INIT_RATIO_WARN))
    kinds = _parameter_kinds(model)
    modules = dict(model.named_modules())
    table: dict[str, dict[str, Any]] = {}
    flagged: dict[str, tuple[Status, str]] = {}
    for name, parameter in model.named_parameters():
        data = parameter.detach().float()
        kind = kinds.get(name) or ("vector" if data.dim() <= 1 else "matrix")
        row: dict[str, Any] = {"kind": kind, "shape": list(data.shape)}
        table[name] = row
        if not bool(torch.isfinite(data).all()):
            flagged[name] = ("fail", "NaN or Inf in the weights")
            continue
        std = float(data.std()) if data.numel() > 1 else 0.0
        row.update(mean=float(data.mean()), std=std)
        # Norm gains of ones, zero biases, zero gates (ReZero, Gemma's 1 + w norms) are by
        # design: vectors and norm parameters are only checked for being finite.
        if kind in ("norm", "vector"):
            continue
        zero = not bool(data.count_nonzero())
        if kind == "embedding":
            if zero:
                flagged[name] = ("warn", "all zeros (an embedding that starts at zero)")
            elif not EMBEDDING_STD_FAIL[0] <= std <= EMBEDDING_STD_FAIL[1]:
                flagged[name] = ("fail", f"std {std:.3g} outside {list(EMBEDDING_STD_FAIL)}")
            continue
        if zero:
            flagged[name] = ("fail", "an all-zero weight matrix")
            continue
        owner = modules.get(name.rpartition(".")[0])
        # The reading closest to 1/sqrt(fan-in), when the orientation is not known.
        fan_in, ratio = min(
            ((f, std * math.sqrt(max(f, 1))) for f in _fan_ins(data, owner)),
            key=lambda pair: abs(math.log(pair[1])) if pair[1] > 0 else math.inf,
        )
        row.update(fan_in=fan_in, std_x_sqrt_fan_in=ratio)
        if not fail_band[0] <= ratio <= fail_band[1]:
            flagged[name] = ("fail", f"std {std:.3g} = {ratio:.3g} / sqrt(fan-in {fan_in})")
        elif not warn_band[0] <= ratio <= warn_band[1]:
            flagged[name] = ("warn", f"std {std:.3g} = {ratio:.3g} / sqrt(fan-in {fan_in})")
    for name, (status, why) in flagged.items():
        table[name].update(verdict=status, why=why)
    threshold = {
        "std_x_sqrt_fan_in_fail_outside": list(fail_band),
        "std_x_sqrt_fan_in_warn_outside": list(warn_band),
        "embedding_std_fail_outside": list(EMBEDDING_STD_FAIL),
    }
    details = {"parameters": table}
    failing = [n for n, (s, _) in flagged.items() if s == "fail"]
    listed = "; ".join(f"{n}: {why}" for n, (_, why) in list(flagged.items())[:6])
    if failing:
        return Outcome(
            "fail",
            len(flagged),
            threshold,
            f"{len(failing)} badly initialised parameter(s): {listed}.",
            details,
        )
    if flagged:
        return Outcome(
            "warn", len(flagged), threshold, f"Unusual initialisation: {listed}.", details
        )
    return Outcome(
        "pass",
        0,
        threshold,
        f"All {len(table)} parameters look sanely initialised (norm weights and biases "
        "checked only for NaN/Inf).",
        details,
    )


# -- memory ------------------------------------------------------------------------------------------


def _static_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextlib.contextmanager
def _cpu_allocations() -> Iterator[Callable[[str], int]]:
    """Record CPU allocations with the profiler; yields ``peak(label)``: the highest running
    total of bytes allocated (minus those freed) inside ``record_function(label)``, from the
    profiler's allocation events (c10's CPU allocator, which holds every CPU tensor)."""
    from torch.profiler import ProfilerActivity, profile

    peaks: dict[str, int] = {}

    def peak(label: str) -> int:
        return peaks[label]

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield peak
    events = prof.profiler.kineto_results.events() if prof.profiler else []
    windows = {
        e.name(): (e.start_ns(), e.start_ns() + e.duration_ns())
        for e in events
        if e.name().startswith("tzoo-memory:")
    }
    allocations = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"),
        key=lambda pair: pair[0],
    )
    for label, (start, end) in windows.items():
        running = best = 0
        for at, nbytes in allocations:
            if start <= at <= end:
                running += nbytes
                best = max(best, running)
        peaks[label.removeprefix("tzoo-memory:")] = best


@register("memory", tier=1)
def memory(ctx: CheckContext) -> Outcome:
    """Peak memory of inference and of a training step (forward and backward) over sizes."""
    subject = ctx.subject
    budget = ctx.options.extra.get("memory_budget_mb")
    batches = sorted(set(ctx.options.batch_sizes))
    lengths = _lengths(ctx)
    _, middle = _representative(ctx)
    sizes = sorted({(b, t) for b in (batches[0], batches[-1]) for t in {middle, lengths[-1]}})
    trainee = copy.deepcopy(subject.model).train()
    static = _static_bytes(subject.model)
    cuda = subject.device.type == "cuda"
    runs: list[tuple[str, str, Callable[[], None]]] = []
    for batch, length in sizes:
        ids = ctx.ids(batch, length, offset=11)

        def infer(ids: Tensor = ids) -> None:
            _forward(subject, ids, _ones(ids))

        def train(ids: Tensor = ids) -> None:
            trainee.zero_grad(set_to_none=True)
            training_loss(subject, trainee, ids).backward()

        runs.append((f"{batch}x{length}", "inference", infer))
        runs.append((f"{batch}x{length}", "training", train))
    table: dict[str, dict[str, float]] = {}
    errors: list[str] = []

    def record(size: str, mode: str, transient: int) -> None:
        table.setdefault(size, {})[f"{mode}_mb"] = (static + transient) / _MB

    if cuda:
        # The CUDA allocator's own peak, less what was allocated before the run.
        for size, mode, fn in runs:
            trainee.zero_grad(set_to_none=True)
            torch.cuda.synchronize(subject.device)
            base = torch.cuda.memory_allocated(subject.device)
            torch.cuda.reset_peak_memory_stats(subject.device)
            try:
                fn()
                torch.cuda.synchronize(subject.device)
            except Exception as error:
                errors.append(f"{mode} {size}: {type(error).__name__}: {error}"[:300])
                continue
            record(size, mode, torch.cuda.max_memory_allocated(subject.device) - base)
        how = "torch.cuda.max_memory_allocated during each run, plus parameters and buffers"
    else:
        from torch.autograd.profiler import record_function

        with _cpu_allocations() as peak:
            for size, mode, fn in runs:
                trainee.zero_grad(set_to_none=True)  # free the last gradients outside the window
                with record_function(f"tzoo-memory:{mode} {size}"):
                    try:
                        fn()
                    except Exception as error:
                        errors.append(f"{mode} {size}: {type(error).__name__}: {error}"[:300])
        for size, mode, _ in runs:
            with contextlib.suppress(KeyError):
                record(size, mode, peak(f"{mode} {size}"))
        how = (
            "parameters and buffers plus the peak of CPU bytes allocated during each run "
            "(torch.profiler with profile_memory=True; allocations outside PyTorch's "
            "allocator, such as oneDNN scratch space, are not seen)"
        )
    value = {
        "inference_mb": max((v.get("inference_mb", 0.0) for v in table.values()), default=0.0),
        "training_mb": max((v.get("training_mb", 0.0) for v in table.values()), default=0.0),
    }
    details = {"sizes_mb": table, "static_mb": static / _MB, "measured": how}
    if errors:
        details["errors"] = errors
        return Outcome("fail", value, budget, f"Memory could not be measured: {errors[0]}", details)
    biggest = max(value.values())
    summary = (
        f"peak {value['inference_mb']:.1f} MB inference, {value['training_mb']:.1f} MB training "
        f"(largest of {len(sizes)} sizes, up to {sizes[-1][0]}x{sizes[-1][1]})"
    )
    if budget is not None and biggest > float(budget):
        return Outcome("warn", value, budget, f"Above the {budget} MB budget: {summary}.", details)
    return Outcome("pass", value, budget, summary[0].upper() + summary[1:] + ".", details)


# -- latency -------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@register("latency", tier=1)
def latency(ctx: CheckContext) -> Outcome:
    """p50 and p95 forward latency at a representative size, after a warm-up."""
    subject = ctx.subject
    budget = ctx.options.extra.get("latency_budget_ms")
    batch, length = _representative(ctx)
    ids = ctx.ids(batch, length, offset=12)
    cuda = subject.device.type == "cuda"
    for _ in range(2):  # warm-up: lazy initialisation, caches, kernel selection
        _forward(subject, ids, _ones(ids))
    times: list[float] = []
    for _ in range(max(1, ctx.options.latency_runs)):
        if cuda:
            torch.cuda.synchronize(subject.device)
        started = time.perf_counter()
        _forward(subject, ids, _ones(ids))
        if cuda:
            torch.cuda.synchronize(subject.device)
        times.append((time.perf_counter() - started) * 1000)
    value = {"p50_ms": _percentile(times, 0.5), "p95_ms": _percentile(times, 0.95)}
    details = {"batch": batch, "length": length, "runs_ms": times, "device": str(subject.device)}
    summary = (
        f"p50 {value['p50_ms']:.2f} ms, p95 {value['p95_ms']:.2f} ms for batch {batch} x "
        f"length {length} over {len(times)} runs"
    )
    if budget is not None and value["p95_ms"] > float(budget):
        return Outcome(
            "warn", value, budget, f"p95 above the {budget} ms budget: {summary}.", details
        )
    return Outcome("pass", value, budget, summary + ".", details)


# -- save / load ----------------------------------------------------------------------------------------


@register("save_load", tier=1)
def save_load(ctx: CheckContext) -> Outcome:
    """A state_dict saved to disk and loaded into a fresh model gives identical logits."""
    subject, atol = ctx.subject, ctx.options.atol
    batch, length = _representative(ctx)
    ids = ctx.ids(batch, length, offset=13)
    reference = _forward(subject, ids, _ones(ids))
    formats: dict[str, dict[str, Any]] = {}

    def compare(name: str, load: Callable[[Path], nn.Module], folder: Path) -> None:
        try:
            model = load(folder).to(subject.device).eval()
            logits = _forward(subject, ids, _ones(ids), model=model)
            formats[name] = {"max_abs_diff": _max_diff(logits, reference)}
        except Exception as error:
            formats[name] = {"error": f"{type(error).__name__}: {error}"[:400]}

    def torch_save(folder: Path) -> nn.Module:
        file = folder / "state_dict.pt"
        torch.save(subject.model.state_dict(), file)
        fresh = subject.fresh_model()
        fresh.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        return fresh

    def safetensors_save(folder: Path) -> nn.Module:
        from safetensors.torch import load_model, save_model

        file = folder / "model.safetensors"
        save_model(subject.model, str(file))  # drops shared (tied) tensors' duplicates
        fresh = subject.fresh_model()
        load_model(fresh, str(file), device=str(subject.device))
        return fresh

    def hf_save(folder: Path) -> nn.Module:
        subject.model.save_pretrained(folder)  # type: ignore[operator]
        return type(subject.model).from_pretrained(folder)  # type: ignore[attr-defined]

    savers: list[tuple[str, Callable[[Path], nn.Module]]] = [("torch.save", torch_save)]
    try:
        import safetensors.torch  # noqa: F401

        savers.append(("safetensors", safetensors_save))
    except ImportError:
        pass
    if subject.is_hf:
        savers.append(("save_pretrained", hf_save))
    for name, load in savers:
        with tempfile.TemporaryDirectory(prefix="tzoo-save-load-") as folder:
            compare(name, load, Path(folder))
    details = {"formats": formats, "fresh_model": "factory" if subject.factory else "deep copy"}
    errors = [f"{k}: {v['error']}" for k, v in formats.items() if "error" in v]
    diffs = {k: v["max_abs_diff"] for k, v in formats.items() if "max_abs_diff" in v}
    worst = max(diffs.values(), default=0.0)
    if errors:
        return Outcome(
            "fail", worst, atol, "Saving and loading failed: " + "; ".join(errors), details
        )
    if worst > atol:
        bad = [k for k, v in diffs.items() if v > atol]
        return Outcome(
            "fail",
            worst,
            atol,
            f"Reloaded weights give other logits ({', '.join(bad)}: max diff {_fmt(worst)}): "
            "the model keeps state outside its state_dict (a tensor attribute that is not a "
            "parameter or buffer?).",
            details,
        )
    return Outcome(
        "pass",
        worst,
        atol,
        f"Reloaded through {', '.join(diffs)}: logits match (max diff {_fmt(worst)}).",
        details,
    )
