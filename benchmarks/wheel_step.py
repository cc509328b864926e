"""Token-wheel step latency: the key/value cache (one token's forward pass per append)
against a full recompute of the whole context (what the seed did), and memory per session.

For each context length, a session holds exactly that many prompt tokens; one step is
``append(token)`` (which also builds the wheel shown for it) plus ``distribution()`` of the
new context, timed with the cache (median of --steps, each undone untimed) and as a
full recompute of the same context (median of --full-steps). Goals: ratio >= 5x at 256
tokens, and incremental latency about flat as the context grows.

Memory: --sessions live sessions of 256 tokens (240 prompt tokens plus 16 appends, so
the logit history is full); the process RSS growth per session (psutil) against the
bytes of the key/value tensors and kept logit vectors each session reports.

    .venv/bin/python benchmarks/wheel_step.py [--model smollm2-135m] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from tzoo.analyses.next_token import Sampling
from tzoo.config import Settings, get_settings
from tzoo.runtime.manager import ModelManager
from tzoo.service.wheel import SessionStore, WheelSession

CONTEXTS = (32, 128, 256, 512)
PLAIN = Sampling()
THRESHOLD = 0.02
SENTENCES = (
    "The river bends twice before it reaches the old mill at the edge of town.",
    "Every spring the orchards flower, and the bees return from the southern hills.",
    "A lighthouse keeper writes down the weather, the ships and the colour of the sea.",
    "Numbers such as 17, 256 and 1024 appear in the ledger beside each entry.",
    "Children learn the names of the stars from a map painted on the school ceiling.",
)


def corpus_ids(tokenizer: Any, n: int) -> list[int]:
    """``n`` token ids of varied English text, tokenised once."""
    text = " ".join(f"{i}. {SENTENCES[i % len(SENTENCES)]}" for i in range(4 * n // 15 + 8))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return list(ids[:n])


def median_ms(run: Callable[[], object], repeats: int, after: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
        after()
    return statistics.median(times)


def step_latency(
    session: WheelSession, ids: list[int], steps: int, full_steps: int
) -> tuple[float, float]:
    """(incremental ms, full-recompute ms) of one step at context ``len(ids)``."""
    session.set_prompt_ids(ids)
    token = ids[len(ids) // 2]

    def incremental() -> None:
        session.append(token, sampling=PLAIN, threshold=THRESHOLD)
        session.distribution(PLAIN)

    def full() -> None:
        session.full_recompute_distribution(PLAIN)

    median_ms(incremental, 2, session.undo)  # warm-up
    inc = median_ms(incremental, steps, session.undo)
    full_ms = median_ms(full, full_steps, lambda: None)
    return inc, full_ms


def latency_table(
    store: SessionStore, model: str, tokenizer: Any, steps: int, full_steps: int
) -> None:
    session = store.create(model)
    ids = corpus_ids(tokenizer, max(CONTEXTS))
    print(f"{'context':>8} {'incremental ms':>15} {'full recompute ms':>18} {'ratio':>7}")
    incremental: dict[int, float] = {}
    for n in CONTEXTS:
        inc, full = step_latency(session, ids[:n], steps, full_steps)
        incremental[n] = inc
        print(f"{n:>8} {inc:>15.2f} {full:>18.2f} {full / inc:>6.1f}x")
    growth = incremental[CONTEXTS[-1]] / incremental[CONTEXTS[0]]
    flat = "flat" if growth < 1.5 else "NOT flat"
    print(f"incremental at {CONTEXTS[-1]} / at {CONTEXTS[0]} tokens: {growth:.2f}x ({flat})")
    store.delete(session.id)


def rss_bytes() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def memory_per_session(store: SessionStore, model: str, tokenizer: Any, n_sessions: int) -> None:
    ids = corpus_ids(tokenizer, 256)
    sessions = []
    before = rss_bytes()
    for _ in range(n_sessions):
        session = store.create(model)
        session.set_prompt_ids(ids[:240])
        for token in ids[240:256]:
            session.append(token, sampling=PLAIN, threshold=THRESHOLD)
        sessions.append(session)
    growth = (rss_bytes() - before) / n_sessions
    held = sessions[-1].memory_bytes()
    mib = 1024 * 1024
    print(f"memory per live session ({n_sessions} sessions, 256-token contexts):")
    print(f"  process RSS growth per session: {growth / mib:7.2f} MiB")
    print(f"  key/value cache per session:    {held['kv_cache'] / mib:7.2f} MiB")
    print(f"  kept logit vectors per session: {held['logits'] / mib:7.2f} MiB")
    steps = sessions[-1].steps
    wheel_bytes = sum(len(repr(step.wheel)) for step in steps)
    print(f"  recorded steps (wheels, approx): {wheel_bytes / mib:7.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: TZOO_CACHE_DIR")
    parser.add_argument("--steps", type=int, default=10, help="incremental steps per context")
    parser.add_argument("--full-steps", type=int, default=5, help="full recomputes per context")
    parser.add_argument("--sessions", type=int, default=8, help="live sessions for memory")
    args = parser.parse_args()

    settings = get_settings()
    if args.cache_dir is not None:
        settings = Settings(cache_dir=args.cache_dir, data_dir=args.cache_dir / "data")
    settings = settings.model_copy(update={"wheel_max_context_tokens": 4096})
    manager = ModelManager(settings)
    handle = manager.get(args.model)
    print(
        f"model: {args.model} on {handle.device} ({handle.dtype}), torch threads {torch.get_num_threads()}"
    )
    store = SessionStore(settings, manager)
    latency_table(store, args.model, handle.tokenizer, args.steps, args.full_steps)
    memory_per_session(store, args.model, handle.tokenizer, args.sessions)


if __name__ == "__main__":
    main()
