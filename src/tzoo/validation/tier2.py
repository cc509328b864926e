"""Tier 2: what the model computes, not only whether it runs.

- ``attention_stats``: on 2 random sequences of 16 tokens, per head: entropy of each row
  divided by the log of the number of keys it may attend (0 one-hot, 1 uniform), averaged;
  total variation from uniform; mean attention on the first token (a sink at >= 0.5); the
  mean Jensen-Shannon distance (base 2) to every other head of its layer. A head is
  collapsed at entropy <= 0.05, near-uniform at variation <= 0.02, a duplicate of an earlier
  head at distance <= 0.05. Warn when half the heads or more are one of these; fail only for
  impossible patterns: NaN, rows not summing to 1 (1e-3; 1e-2 in half precision), attention
  on future tokens in a causal model.
- ``integrated_gradients``: Captum's LayerIntegratedGradients on the module that embeds the
  input ids, for the top logit at the last position (an encoder's middle one), from a
  baseline of pad (else 0) ids, Gauss-Legendre with ``ig_steps`` steps (and once 4x more when
  above the warn bar). Completeness says the attributions sum to f(x) - f(baseline);
  |delta| / |f(x) - f(baseline)| warns above 0.05 (the usual IG bar: more steps needed) and
  fails above 0.5 (the attributions do not explain the output).
- ``robustness``: Gaussian noise of 1%, 5%, 10% and 50% of the embeddings' std added to the
  embedding output, giving top-1 agreement and KL against the clean run (warn when 1% noise
  changes the top-1 prediction at half the positions or more); and 10/25/50% of the tokens
  replaced, measuring how the logits at the positions left alone move (a curve, no bar).

Every number above is a key of ``DEFAULTS``, overridden through ``options.extra``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tzoo.validation.registry import CheckContext, Outcome, SkipCheck, register
from tzoo.validation.report import Status
from tzoo.validation.subject import Subject, attention_patterns

DEFAULTS: dict[str, Any] = {
    # attention_stats
    "attention_length": 16,
    "collapsed_entropy": 0.05,  # mean normalised entropy at or below: a near one-hot head
    "uniform_tv": 0.02,  # mean total variation from uniform at or below: a near-uniform head
    "redundant_js": 0.05,  # Jensen-Shannon distance to an earlier head at or below: a duplicate
    "sink_share": 0.5,  # mean attention on the first token at or above: a sink head
    "degenerate_warn_share": 0.5,  # warn when this share of heads is collapsed/uniform/duplicate
    "row_sum_tol": 1e-3,  # float32 rows; half precision gets 1e-2
    "future_tol": 1e-6,
    # integrated_gradients
    "ig_length": 12,
    "ig_warn_delta": 0.05,
    "ig_fail_delta": 0.5,
    "ig_retry_factor": 4,  # one retry with this many times the steps when above the warn bar
    # robustness
    "robustness_batch": 4,
    "robustness_length": 16,
    "noise_levels": (0.01, 0.05, 0.1, 0.5),  # noise std as a fraction of the embeddings' std
    "substitution_fractions": (0.1, 0.25, 0.5),
    "noise_min_agreement": 0.5,  # top-1 agreement under the smallest noise below: warn
}


def _extra(ctx: CheckContext, key: str) -> Any:
    return ctx.options.extra.get(key, DEFAULTS[key])


# -- attention statistics -----------------------------------------------------------------------


def attended_lengths(n_queries: int, n_keys: int, causal: bool) -> Tensor:
    """(Tq,) how many keys each query may attend: all of them, or under a causal mask those
    up to its own position (queries aligned to the last keys, as with a cache)."""
    if not causal:
        return torch.full((n_queries,), n_keys, dtype=torch.long)
    return torch.arange(n_queries) + 1 + (n_keys - n_queries)


def causal_allowed(n_queries: int, n_keys: int) -> Tensor:
    """(Tq, Tk) bool: the keys a causal query may attend."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool).tril(n_keys - n_queries)


def normalised_entropy(weights: Tensor, causal: bool) -> Tensor:
    """(B, H, Tq) entropy of each attention row divided by the log of the number of keys the
    row may attend (0: one-hot, 1: uniform); NaN for rows with fewer than two such keys."""
    p = weights.double()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # 0 log 0 taken as 0
    n = attended_lengths(p.shape[-2], p.shape[-1], causal).to(p.device).double()
    log_n = torch.log(n)
    return torch.where(n >= 2, entropy / log_n.clamp_min(1e-12), torch.nan)


def distance_from_uniform(weights: Tensor, causal: bool) -> Tensor:
    """(B, H, Tq) total variation distance of each row from uniform over its allowed keys
    (NaN for rows with fewer than two)."""
    p = weights.double()
    tq, tk = p.shape[-2:]
    allowed = causal_allowed(tq, tk) if causal else torch.ones(tq, tk, dtype=torch.bool)
    allowed = allowed.to(p.device)
    n = allowed.sum(-1).double()
    uniform = allowed.double() / n[:, None]
    tv = 0.5 * (p - uniform).abs().sum(-1)
    return torch.where(n >= 2, tv, torch.nan)


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance (base 2, in [0, 1]) between distributions on the last axis."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (torch.log2(a.clamp_min(1e-300)) - torch.log2(b.clamp_min(1e-300)))).sum(-1)

    divergence = (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0.0)
    return torch.sqrt(divergence)


def _nanmean(values: Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _is_causal_layer(subject: Subject, source: str, n_queries: int, n_keys: int) -> bool | None:
    """Whether this pattern must be causal: True for a decoder's self-attention, False for an
    encoder's; None when the source does not tell (a plain encoder-decoder module)."""
    if n_queries > n_keys:
        return False
    if subject.kind == "decoder":
        return True
    if subject.kind == "encoder":
        return False
    if source.startswith("decoder_attentions"):
        return True
    if source.startswith("encoder_attentions"):
        return False
    return None


@register("attention_stats", tier=2)
def attention_stats(ctx: CheckContext) -> Outcome:
    """Attention entropy per head, collapsed/uniform/duplicate heads, sinks; impossible patterns fail."""
    subject = ctx.subject
    length = subject.longest(int(_extra(ctx, "attention_length")))
    if length < 2:
        raise SkipCheck(f"The model takes at most {length} token; attention needs two.")
    ids = ctx.ids(2, length, offset=201)
    try:
        captured = attention_patterns(subject, ids)
    except Exception as error:
        raise SkipCheck(f"Capturing attention failed ({type(error).__name__}: {error}).") from error
    if not captured.weights:
        raise SkipCheck(
            "No attention weights could be captured: the model returned no output_attentions, "
            "and computes attention with neither nn.MultiheadAttention nor "
            "F.scaled_dot_product_attention (a hand-written softmax(QK^T) cannot be seen)."
        )
    collapsed_bar = float(_extra(ctx, "collapsed_entropy"))
    uniform_bar = float(_extra(ctx, "uniform_tv"))
    redundant_bar = float(_extra(ctx, "redundant_js"))
    sink_bar = float(_extra(ctx, "sink_share"))
    warn_share = float(_extra(ctx, "degenerate_warn_share"))
    future_tol = float(_extra(ctx, "future_tol"))

    heads: list[dict[str, Any]] = []
    impossible: list[str] = []
    for layer, (weights, source) in enumerate(zip(captured.weights, captured.sources, strict=True)):
        if weights.dim() == 3:  # (B, Tq, Tk): a module that averaged its heads
            weights = weights[:, None]
        half = weights.dtype in (torch.float16, torch.bfloat16)
        sum_tol = 1e-2 if half else float(_extra(ctx, "row_sum_tol"))
        w = weights.detach().double().cpu()
        _, n_heads, tq, tk = w.shape
        must_be_causal = _is_causal_layer(subject, source, tq, tk)
        # A pattern with nothing above the diagonal is treated as causal for the lengths,
        # also where the source does not say.
        looks_causal = tq <= tk and bool((w.masked_fill(causal_allowed(tq, tk), 0) == 0).all())
        causal = bool(must_be_causal) or (must_be_causal is None and looks_causal)
        entropy = normalised_entropy(w, causal)
        tv = distance_from_uniform(w, causal)
        for head in range(n_heads):
            p = w[:, head]
            problems = []
            if not torch.isfinite(p).all():
                problems.append("NaN/Inf weights")
            elif (p < -1e-6).any():
                problems.append("negative weights")
            else:
                sums = p.sum(-1)
                worst = float((sums - 1).abs().max())
                if worst > sum_tol:
                    problems.append(f"rows sum to 1 ± {worst:.3g}")
                if must_be_causal:
                    future = float(p.masked_fill(causal_allowed(tq, tk), 0).sum(-1).max())
                    if future > future_tol:
                        problems.append(f"{future:.3g} of a row's attention on future tokens")
            record: dict[str, Any] = {
                "layer": layer,
                "source": source,
                "head": head,
                "entropy": _nanmean(entropy[:, head]),
                "distance_from_uniform": _nanmean(tv[:, head]),
                # The first query's only key is itself under a causal mask: not a sink.
                "sink": float(p[:, 1:, 0].mean()) if tq > 1 else math.nan,
                "max_weight": float(p.max(-1).values.mean()) if not problems else math.nan,
                "flags": [],
            }
            if problems:
                record["flags"].append("impossible")
                record["problems"] = problems
                impossible.append(f"layer {layer} ({source}) head {head}: {'; '.join(problems)}")
            heads.append(record)

        # Duplicates: a head whose pattern is within the bar of an earlier head's, by the mean
        # Jensen-Shannon distance over the rows that have a choice.
        layer_heads = heads[-n_heads:]
        rows = attended_lengths(tq, tk, causal) >= 2
        similarity: list[list[float]] = [[0.0] * n_heads for _ in range(n_heads)]
        for a in range(n_heads):
            for b in range(a + 1, n_heads):
                if (
                    "impossible" in layer_heads[a]["flags"]
                    or "impossible" in layer_heads[b]["flags"]
                ):
                    distance = math.nan
                else:
                    distance = float(js_distance(w[:, a, rows], w[:, b, rows]).mean())
                similarity[a][b] = similarity[b][a] = distance
        for b in range(n_heads):
            earlier = [(similarity[a][b], a) for a in range(b) if not math.isnan(similarity[a][b])]
            record = layer_heads[b]
            record["nearest_head_js"] = min(
                (
                    similarity[a][b]
                    for a in range(n_heads)
                    if a != b and not math.isnan(similarity[a][b])
                ),
                default=math.nan,
            )
            if "impossible" in record["flags"]:
                continue
            if record["entropy"] <= collapsed_bar:
                record["flags"].append("collapsed")
            if record["distance_from_uniform"] <= uniform_bar:
                record["flags"].append("uniform")
            # Two near-uniform heads are alike by being uniform: that is said once, above.
            uniform = "uniform" in record["flags"]
            earlier = [
                (d, a) for d, a in earlier if not (uniform and "uniform" in layer_heads[a]["flags"])
            ]
            if earlier and min(earlier)[0] <= redundant_bar:
                record["flags"].append("duplicate")
                record["duplicate_of"] = min(earlier)[1]
            if record["sink"] >= sink_bar:
                record["flags"].append("sink")

    def count(flag: str) -> int:
        return sum(flag in h["flags"] for h in heads)

    degenerate = sum(
        any(f in h["flags"] for f in ("collapsed", "uniform", "duplicate")) for h in heads
    )
    share = degenerate / len(heads)
    counts = {f: count(f) for f in ("collapsed", "uniform", "duplicate", "sink", "impossible")}
    summary = (
        f"{len(heads)} heads in {len(captured.weights)} layers: {counts['collapsed']} collapsed "
        f"(near one-hot), {counts['uniform']} near-uniform, {counts['duplicate']} duplicating an "
        f"earlier head, {counts['sink']} sinks (≥ {sink_bar:.0%} on the first token)"
    )
    details: dict[str, Any] = {
        "heads": heads,
        "counts": counts,
        "mean_entropy": _nanmean(torch.tensor([h["entropy"] for h in heads], dtype=torch.double)),
        "mean_sink": _nanmean(torch.tensor([h["sink"] for h in heads], dtype=torch.double)),
        "input_ids": ids.tolist(),
        "thresholds": {
            "collapsed_entropy": collapsed_bar,
            "uniform_tv": uniform_bar,
            "redundant_js": redundant_bar,
            "sink_share": sink_bar,
            "degenerate_warn_share": warn_share,
        },
        "method": (
            "entropy: mean over rows of -sum p log p / log(keys the row may attend); uniform: "
            "mean total variation from uniform; duplicate: mean Jensen-Shannon distance "
            "(base 2) to an earlier head of the same layer"
        ),
    }
    status: Status
    if impossible:
        status = "fail"
        hint = ""
        if subject.kind == "decoder" and any("future" in text for text in impossible):
            hint = (
                " The model is validated as a causal decoder; if it is a bidirectional encoder, "
                'say so in its config ("causal": false).'
            )
        message = (
            f"Impossible attention in {len(impossible)} head(s): "
            + "; ".join(impossible[:4])
            + ("; …" if len(impossible) > 4 else "")
            + "."
            + hint
        )
    elif share >= warn_share:
        status = "warn"
        message = f"{degenerate}/{len(heads)} heads are degenerate. {summary}."
        if counts["uniform"] == len(heads):
            message += " Every head is near-uniform, as in an untrained model."
    else:
        status = "pass"
        message = summary + "."
    return Outcome(status, share, warn_share, message, details)


# -- finding the input embedding -----------------------------------------------------------------


def _embedding_candidates(model: nn.Module) -> list[nn.Module]:
    """Modules that may embed the input ids, the likeliest first: a Hugging Face model's
    encoder's and own input embeddings, then every nn.Embedding in registration order."""
    found: list[nn.Module] = []
    getters = []
    get_encoder = getattr(model, "get_encoder", None)
    if callable(get_encoder):
        with contextlib.suppress(Exception):
            encoder = get_encoder()
            getters.append(getattr(encoder, "get_input_embeddings", None))
    getters.append(getattr(model, "get_input_embeddings", None))
    for getter in getters:
        if callable(getter):
            with contextlib.suppress(Exception):
                module = getter()
                if isinstance(module, nn.Module):
                    found.append(module)
    found.extend(m for m in model.modules() if isinstance(m, nn.Embedding))
    unique: list[nn.Module] = []
    for module in found:
        if all(module is not seen for seen in unique):
            unique.append(module)
    return unique


def input_embedding(subject: Subject, input_ids: Tensor) -> tuple[nn.Module, str]:
    """(module, its name): the module that turns ``input_ids`` themselves into vectors, found
    by running the model once and watching which candidate receives them (a position
    embedding receives positions, a tied unembedding is not called). SkipCheck if none."""
    candidates = _embedding_candidates(subject.model)
    fed: list[nn.Module] = []

    def watch(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if (
            args
            and isinstance(args[0], Tensor)
            and args[0].shape == input_ids.shape
            and torch.equal(args[0], input_ids)
        ):
            fed.append(module)

    handles = [m.register_forward_hook(watch) for m in candidates]
    try:
        with torch.no_grad():
            subject.call(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    for module in candidates:
        if any(module is seen for seen in fed):
            names = {m: n for n, m in subject.model.named_modules()}
            return module, names.get(module, type(module).__name__) or "(the model)"
    raise SkipCheck(
        "No embedding module receives the input ids (the model looks tokens up without an "
        "nn.Embedding or get_input_embeddings()), so there is no embedding layer to "
        "attribute to or perturb."
    )


@contextlib.contextmanager
def _embedding_output_hook(module: nn.Module, change: Any) -> Iterator[None]:
    """Replace ``module``'s output by ``change(output)`` inside the block."""
    handle = module.register_forward_hook(lambda _m, _a, output: change(output))
    try:
        yield
    finally:
        handle.remove()


# -- integrated gradients ---------------------------------------------------------------------


@register("integrated_gradients", tier=2)
def integrated_gradients(ctx: CheckContext) -> Outcome:
    """Integrated Gradients on the input embedding (Captum); relative convergence delta."""
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError as error:
        raise SkipCheck(f"Captum is not installed ({error}); pip install captum.") from error
    subject = ctx.subject
    ids = ctx.ids(1, int(_extra(ctx, "ig_length")), offset=202)
    layer, layer_name = input_embedding(subject, ids)
    # An encoder-decoder's decoder reads the real input's shifted ids for both the input and
    # the baseline: only the encoder side is attributed, so the decoder side must not move.
    decoder_ids = subject.decoder_inputs(ids) if subject.kind == "encoder-decoder" else None
    with torch.no_grad():
        clean = subject.logits(ids, decoder_input_ids=decoder_ids)
    position = clean.shape[1] - 1 if subject.causal else clean.shape[1] // 2
    target = int(clean[0, position].argmax())

    def forward(input_ids: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        logits = subject.logits(input_ids, decoder_input_ids=decoder_input_ids)
        return logits[:, position, target]

    baseline_id = subject.pad_token_id if subject.pad_token_id is not None else 0
    baseline = torch.full_like(ids, baseline_id)
    extra_args = (decoder_ids,) if decoder_ids is not None else None
    baseline_embedding: list[Tensor] = []

    def keep(output: Any) -> None:
        if isinstance(output, Tensor):
            baseline_embedding.append(output.detach())

    with torch.no_grad():
        f_input = float(forward(ids, decoder_ids)[0])
        with _embedding_output_hook(layer, keep):
            f_baseline = float(forward(baseline, decoder_ids)[0])
    if not (math.isfinite(f_input) and math.isfinite(f_baseline)):
        raise SkipCheck(
            f"The target logit is not finite (input {f_input}, baseline {f_baseline}); "
            "see the nan_inf check."
        )
    zero_baseline = bool(baseline_embedding) and not bool(baseline_embedding[0].any())
    difference = f_input - f_baseline
    warn_bar = float(_extra(ctx, "ig_warn_delta"))
    fail_bar = float(_extra(ctx, "ig_fail_delta"))
    steps = int(ctx.options.ig_steps)
    attempts: list[dict[str, Any]] = []
    lig = LayerIntegratedGradients(forward, layer)
    while True:
        try:
            attributions, delta = lig.attribute(
                ids,
                baselines=baseline,
                additional_forward_args=extra_args,
                n_steps=steps,
                method="gausslegendre",
                return_convergence_delta=True,
            )
        except RuntimeError as error:
            # Autograd's complaint when the output does not depend on the embedding's output
            # differentiably (detached, or computed outside autograd).
            return Outcome(
                "fail",
                None,
                {"warn": warn_bar, "fail": fail_bar},
                f"No gradient reaches {layer_name} from the target logit: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                {"embedding": layer_name, "position": position, "target_token": target},
            )
        absolute = abs(float(delta.reshape(-1)[0]))
        relative = absolute / abs(difference) if difference != 0 else math.inf
        if math.isnan(relative):  # non-finite gradients: judged as a total failure
            relative = math.inf
        attempts.append({"steps": steps, "delta": absolute, "relative_delta": relative})
        if relative <= warn_bar or len(attempts) > 1 or abs(difference) < 1e-6:
            break
        steps *= int(_extra(ctx, "ig_retry_factor"))
    per_token = attributions.detach().float().sum(-1)[0].cpu()
    details: dict[str, Any] = {
        "embedding": layer_name,
        "position": position,
        "target_token": target,
        "f_input": f_input,
        "f_baseline": f_baseline,
        "difference": difference,
        "delta": absolute,
        "relative_delta": relative,
        "attributions_sum": float(per_token.sum()),
        "steps": steps,
        "attempts": attempts,
        "method": "gausslegendre",
        "baseline_embedding_is_zero": zero_baseline,
        "baseline": f"every token the pad id {baseline_id}"
        if subject.pad_token_id is not None
        else "every token id 0 (no pad id)",
        "input_ids": ids[0].tolist(),
        "attributions": per_token.tolist(),
        "thresholds": {"warn": warn_bar, "fail": fail_bar},
        "why": (
            "Completeness: attributions sum to f(input) - f(baseline) up to the integration "
            f"error. Above {warn_bar:.0%} of that difference the attributions need more steps "
            f"(the usual IG bar); above {fail_bar:.0%} they do not explain the output (gradients "
            "not flowing through the embedding, or a non-smooth model)."
        ),
    }
    status: Status
    if abs(difference) < 1e-6:
        status = "warn"
        message = (
            f"The baseline and the input give the same target logit ({f_input:.4g}); the "
            f"convergence delta ({absolute:.3g}) cannot be judged against a difference of 0."
        )
        return Outcome(status, relative, warn_bar, message, details)
    where = "the last position" if subject.causal else f"position {position}"
    explained = (
        f"IG on {layer_name} for token {target} at {where}: attributions sum to "
        f"{float(per_token.sum()):.4g} for f(x) - f(baseline) = {difference:.4g}; relative "
        f"convergence delta {relative:.3g} with {steps} steps"
    )
    # e.g. LLaMA: the pad row is zeros, and RMSNorm(a * x) jumps from 0 to x / rms(x) within
    # a tiny a, where few integration points fall.
    zero_hint = (
        " The baseline's embedding is all zeros, and a normalisation of it is discontinuous "
        "there: try more steps."
        if zero_baseline
        else ""
    )
    if relative > fail_bar:
        status = "fail"
        message = f"{explained} (above {fail_bar}: the attributions do not explain the output).{zero_hint}"
    elif relative > warn_bar:
        status = "warn"
        message = f"{explained} (above {warn_bar}: raise ig_steps).{zero_hint}"
    else:
        status = "pass"
        message = explained + "."
    if len(attempts) > 1:
        message += f" ({attempts[0]['steps']} steps gave {attempts[0]['relative_delta']:.3g}.)"
    return Outcome(status, relative, {"warn": warn_bar, "fail": fail_bar}, message, details)


# -- robustness --------------------------------------------------------------------------------


def _kl(clean: Tensor, other: Tensor) -> float:
    """Mean over positions of KL(clean || other) between the softmaxed logits, in nats."""
    log_p = F.log_softmax(clean.double(), -1)
    log_q = F.log_softmax(other.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@register("robustness", tier=2)
def robustness(ctx: CheckContext) -> Outcome:
    """Embedding noise and token substitution: top-1 agreement and KL against the clean run."""
    subject = ctx.subject
    batch = int(_extra(ctx, "robustness_batch"))
    length = subject.longest(int(_extra(ctx, "robustness_length")))
    ids = ctx.ids(batch, length, offset=203)
    layer, layer_name = input_embedding(subject, ids)
    seen: list[Tensor] = []

    def record(output: Any) -> None:
        if isinstance(output, Tensor):
            seen.append(output.detach())

    with torch.no_grad(), _embedding_output_hook(layer, record):
        clean = subject.logits(ids)
    if not torch.isfinite(clean).all():
        raise SkipCheck("The clean logits are not finite (see the nan_inf check).")
    if not seen:
        raise SkipCheck(f"{layer_name} returned no tensor to perturb.")
    scale = float(seen[0].float().std())
    top = clean.argmax(-1)
    generator = ctx.generator(204)

    noise_curve = []
    for level in _extra(ctx, "noise_levels"):
        sigma = float(level) * scale

        def noisy(output: Tensor, sigma: float = sigma) -> Tensor:
            noise = torch.randn(output.shape, generator=generator, dtype=torch.float32)
            return output + (noise * sigma).to(device=output.device, dtype=output.dtype)

        with torch.no_grad(), _embedding_output_hook(layer, noisy):
            logits = subject.logits(ids)
        finite = bool(torch.isfinite(logits).all())
        noise_curve.append(
            {
                "level": float(level),
                "sigma": sigma,
                "top1_agreement": float((logits.argmax(-1) == top).float().mean()),
                "kl": _kl(clean, logits) if finite else math.nan,
                "finite": finite,
            }
        )

    substitution_curve = []
    floor = min((subject.pad_token_id or 0) + 1, subject.vocab_size - 1)
    spread = float(clean.std())
    for fraction in _extra(ctx, "substitution_fractions"):
        k = max(1, round(float(fraction) * length))
        if k >= length:
            continue
        order = torch.rand(batch, length, generator=generator).argsort(-1)[:, :k].to(ids.device)
        touched = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, order, True)
        # A different token at each chosen place: shift by 1..span-1 within [floor, vocab).
        span = subject.vocab_size - floor
        shift = torch.randint(1, max(span, 2), ids.shape, generator=generator).to(ids.device)
        replaced = floor + (ids - floor + shift) % max(span, 1)
        changed = torch.where(touched, replaced, ids)
        with torch.no_grad():
            logits = subject.logits(changed)
        kept = ~touched
        diff = (logits - clean).abs().mean(-1)[kept]
        substitution_curve.append(
            {
                "fraction": float(fraction),
                "tokens_replaced": k,
                "untouched_top1_agreement": float((logits.argmax(-1) == top)[kept].float().mean()),
                "untouched_mean_abs_logit_change": float(diff.mean()),
                "relative_change": float(diff.mean()) / spread if spread > 0 else math.nan,
                "untouched_kl": _kl(clean[kept], logits[kept]),
            }
        )

    bar = float(_extra(ctx, "noise_min_agreement"))
    smallest = min(noise_curve, key=lambda point: point["level"])
    agreement = smallest["top1_agreement"]
    details: dict[str, Any] = {
        "embedding": layer_name,
        "embedding_std": scale,
        "input_shape": list(ids.shape),
        "noise": noise_curve,
        "substitution": substitution_curve,
        "method": (
            "noise: N(0, (level * std of the embedding output)^2) added to the embedding "
            "output by a forward hook; substitution: k random positions per row replaced by "
            "other random tokens, compared at the positions left alone"
        ),
    }
    curve = ", ".join(f"{p['level']:g}: {p['top1_agreement']:.0%}" for p in noise_curve)
    status: Status = "pass"
    message = f"Top-1 agreement with the clean run under embedding noise (x its std) {curve}."
    if not smallest["finite"]:
        status = "warn"
        message = (
            f"Noise of {smallest['level']:g} x the embeddings' std makes the logits non-finite."
        )
    elif agreement < bar:
        status = "warn"
        message = (
            f"Noise of {smallest['level']:g} x the embeddings' std changes the top-1 prediction "
            f"at {1 - agreement:.0%} of positions (agreement below {bar:.0%}): the model is "
            f"unstable to tiny input perturbations. {message}"
        )
    return Outcome(status, agreement, bar, message, details)
