"""The all-layer logit lens against a plain loop, on the same text, short (16 tokens: a
typical lens-service request) and long (128 tokens).

Ours: ``tzoo.logit_lens`` (one hooked forward pass; every layer's unnormed residual read
through the final norm and unembedding once, reduced at once to top-5, KL to the final
distribution, entropy and the final token's rank).

The plain loop, as a user would write it: ``model(ids, output_hidden_states=True)`` once,
then for each hidden state ``softmax(lm_head(norm(h)))`` and the same statistics. It norms
transformers' last hidden state a second time (that entry is already normed), so its last
layer is not the model's output; the benchmark prints whether it matches.

Both are timed as the median of --repeats runs after one warm-up run; the ratio is
plain / ours (above 1: ours is faster).

    .venv/bin/python benchmarks/lens.py [--model smollm2-135m] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tzoo.analyses.corpus import shipped_corpus
from tzoo.analyses.lens import Readout, logit_lens
from tzoo.config import Settings, get_settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

N_TOKENS = 128
K = 5


def benchmark_text(tokenizer: Any, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of the shipped prose."""
    ids = tokenizer(" ".join(shipped_corpus()), add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids[:n_tokens]))


def median_s(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def plain_loop(handle: ModelHandle, text: str) -> dict[str, Any]:
    """The straightforward all-layer logit lens over ``output_hidden_states``."""
    model = handle.model
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]
    out = model(ids, output_hidden_states=True, use_cache=False)
    model_log_p = torch.log_softmax(out.logits[0].float(), dim=-1)  # (T, V)
    model_p = model_log_p.exp()
    final_ids = model_log_p.argmax(-1, keepdim=True)  # (T, 1)
    tops, kls, entropies, ranks = [], [], [], []
    for h in out.hidden_states:  # (1, T, d) each; the last one is already normed
        logits = model.lm_head(model.model.norm(h))[0].float()  # (T, V)
        probs, log_probs = torch.softmax(logits, dim=-1), torch.log_softmax(logits, dim=-1)
        tops.append(probs.topk(K, dim=-1))
        kls.append((model_p * (model_log_p - log_probs)).sum(-1))
        entropies.append(-(probs * log_probs).sum(-1))
        ranks.append((probs > probs.gather(-1, final_ids)).sum(-1))
    return {
        "top": tops,
        "kl": kls,
        "entropy": entropies,
        "rank": ranks,
        "last_probs": probs,
        "model_probs": model_p,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: TZOO_CACHE_DIR")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, N_TOKENS])
    args = parser.parse_args()

    settings = get_settings()
    if args.cache_dir is not None:
        settings = Settings(cache_dir=args.cache_dir, data_dir=args.cache_dir / "data")
    handle = ModelManager(settings).get(args.model)
    if handle.family != "llama":
        raise SystemExit("The plain loop is written for llama models (model.model.norm).")
    readout = Readout.of(handle)
    print(
        f"model: {args.model} on {handle.device} ({handle.dtype}), "
        f"{readout.n_layers + 1} layers x {readout.vocab_size} vocabulary, "
        f"torch threads {torch.get_num_threads()}"
    )
    for length in args.tokens:
        text = benchmark_text(handle.tokenizer, length)
        n_tokens = len(handle.tokenizer(text)["input_ids"])
        ours_s = median_s(lambda text=text: logit_lens(handle, text, k=K), args.repeats)
        plain_s = median_s(lambda text=text: plain_loop(handle, text), args.repeats)
        print(
            f"{n_tokens:4d} tokens: ours {ours_s * 1000:8.1f} ms, plain loop "
            f"{plain_s * 1000:8.1f} ms (medians of {args.repeats}); "
            f"ratio plain / ours: {plain_s / ours_s:.2f}x"
        )

    result = logit_lens(handle, text, k=K)
    plain = plain_loop(handle, text)
    model_p, plain_last = plain["model_probs"], plain["last_probs"]
    ours_top = torch.from_numpy(result.top_probs[-1])
    model_top = model_p.topk(K, dim=-1).values
    print(
        "last layer equals the model's output: "
        f"ours {torch.allclose(ours_top, model_top, atol=1e-5)} "
        f"(max |diff| of top-{K} probabilities {(ours_top - model_top).abs().max():.2e}), "
        f"plain loop {torch.allclose(plain_last, model_p, atol=1e-5)} "
        f"(max |diff| {(plain_last - model_p).abs().max():.2e}: norm applied twice)"
    )
    below = torch.stack(plain["kl"][:-1]).numpy()
    same = abs(below - result.kl_to_final[:-1]).max()
    print(f"layers below the last: max |KL ours - KL plain| = {same:.2e} nats")


if __name__ == "__main__":
    main()
