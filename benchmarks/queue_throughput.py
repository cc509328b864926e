"""Lens-service throughput under concurrent load: dynamic batching on against off.

A live server (``tzoo serve`` in a subprocess, on a free port, with a temporary data
directory and the usual cache directory, so converted weights are reused) loads the group's
model at start-up; once ``/ready`` answers, one warm-up request runs, then --clients
WebSocket clients connect and, all at once, each sends --requests-per-client logit-lens
requests one after another (a new one when the last has completed). Every request is a
different short sentence (about 10-20 tokens on SmolLM2). Latency is from sending
``analyze`` to receiving ``completed``; the wall time is from the start signal to the last
``completed``; the mean batch size comes from the server's ``/metrics``.

The same workload runs on two servers, batching on (TZOO_DYNAMIC_BATCHING=true, up to
--batch-max requests a batch) and batching off, one after the other (on first; --rounds
repeats the pair with the order alternating and takes the median ratio: on a shared machine
one pair is noisy); the rate limit is off. Goal: throughput ratio on / off >= 3x. The results must not change: for every text, the
top-1 token id at every layer and position with batching must equal the one without
(the benchmark prints the count of cells that differ).

    .venv/bin/python benchmarks/queue_throughput.py [--group smollm2-135m] [--rounds 1] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import httpx
import websockets

from tzoo.config import get_settings

GOAL = 3.0
SUBJECTS = (
    "The old ferryman",
    "A young botanist",
    "My neighbour's cat",
    "The village baker",
    "An exhausted pilot",
    "The quiet librarian",
    "A travelling musician",
    "The harbour master",
)
ACTIONS = (
    "carried a lantern",
    "found a silver key",
    "painted the front door",
    "counted the sheep",
    "lost an umbrella",
    "wrote a long letter",
    "repaired the clock",
    "sang a folk song",
)
PLACES = (
    "across the frozen lake.",
    "behind the railway station.",
    "in the middle of the night.",
    "before the market opened.",
    "under the stone bridge.",
    "near the lighthouse.",
)
TERMINAL = ("completed", "error", "request_cancelled")


def workload(n: int) -> list[str]:
    """``n`` different short sentences, the same on every call."""
    combos = list(product(SUBJECTS, ACTIONS, PLACES))
    # A stride coprime to the number of combinations spreads neighbours across all three.
    stride = 97 if math.gcd(97, len(combos)) == 1 else 1
    texts = []
    for i in range(n):
        subject, action, place = combos[(i * stride) % len(combos)]
        suffix = f" ({i // len(combos)})" if i >= len(combos) else ""
        texts.append(f"{subject} {action} {place}{suffix}")
    return texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(
    *, batching: bool, group: str, batch_max: int, queue_size: int, cache_dir: Path, timeout: float
) -> Iterator[str]:
    """A ``tzoo serve`` subprocess with ``group`` preloaded; yields its base URL once
    ``/ready`` answers 200 and always stops it. A failed start exits with its log's tail."""
    with tempfile.TemporaryDirectory(prefix="tzoo-queue-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        env = {
            **os.environ,
            "TZOO_HOST": "127.0.0.1",
            "TZOO_PORT": str(port),
            "TZOO_DATA_DIR": str(root / "data"),
            "TZOO_CACHE_DIR": str(cache_dir),
            "TZOO_DYNAMIC_BATCHING": "true" if batching else "false",
            "TZOO_AUTO_BATCH_SIZE_MAX": str(batch_max),
            "TZOO_RATE_LIMIT_PER_MINUTE": "0",
            "TZOO_MAX_QUEUE_SIZE": str(queue_size),
            "TZOO_LAZY_LOAD_MODEL": "false",
            "TZOO_DEFAULT_GROUP": group,
            "TZOO_PRELOAD": "",
            "HF_HUB_OFFLINE": "1",
        }
        log_path = root / "server.log"
        url = f"http://127.0.0.1:{port}"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tzoo.cli", "serve", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_ready(process, url, timeout, log_path)
                yield url
            finally:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for line in complaints(log_path):
            print(f"  server log: {line}")


def complaints(log: Path, most: int = 5) -> list[str]:
    """The server log's warnings, errors and tracebacks (the first ``most``, and a count)."""
    lines = [
        line.strip()
        for line in log.read_text(errors="replace").splitlines()
        # loguru's "| ERROR |", uvicorn's "ERROR:", and tracebacks
        if any(word in line for word in ("| WARNING", "| ERROR", "| CRITICAL", "Traceback"))
        or line.startswith(("WARNING:", "ERROR:", "CRITICAL:"))
    ]
    extra = [f"... and {len(lines) - most} more such lines"] if len(lines) > most else []
    return lines[:most] + extra


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _fail(f"the server exited with code {process.returncode} before it was ready", log)
        try:
            response = httpx.get(url + "/ready", timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:300]}"
            if response.status_code == 503 and response.json().get("errors"):
                _fail(f"preloading failed: {last}", log)
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    _fail(f"/ready did not answer 200 within {timeout:g} s (last: {last})", log)


def _fail(reason: str, log: Path) -> None:
    tail = log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"Server start failed: {reason}.\n--- server log (tail) ---\n{tail}")


def batch_histogram(url: str) -> dict[str, float]:
    """The server's batch-size histogram: cumulative bucket counts by upper bound ("1.0",
    "2.0", ..., "+Inf"), plus "sum" (requests run) and "count" (batches run)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith('tzoo_lens_batch_requests_bucket{le="'):
            values[name.split('"')[1]] = float(value)
        elif name in ("tzoo_lens_batch_requests_sum", "tzoo_lens_batch_requests_count"):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> str:
    """Batches run between two histograms, by size range: "1: 4, 9-16: 4"."""
    parts = []
    previous_bound, previous_total = 0, 0.0
    for bound in (b for b in after if b not in ("sum", "count")):
        total = after[bound] - before.get(bound, 0.0)
        if bound == "+Inf":
            span = f">{previous_bound}"
        else:
            upper = int(float(bound))
            span = str(upper) if upper == previous_bound + 1 else f"{previous_bound + 1}-{upper}"
            previous_bound = upper
        if total > previous_total:
            parts.append(f"{span}: {total - previous_total:.0f}")
        previous_total = total
    return ", ".join(parts) or "none"


@dataclass
class Reply:
    text: str
    status: str  # completed, or what went wrong
    latency_s: float
    result: dict[str, Any] | None = None
    message: str = ""


@dataclass
class Oddities:
    """What the protocol should not do: counted, printed when any."""

    counts: Counter[str] = field(default_factory=Counter)

    def note(self, what: str) -> None:
        self.counts[what] += 1


async def request(
    ws: Any, text: str, tag: str, group: str, k: int, odd: Oddities, timeout: float
) -> Reply:
    """Send one logit-lens request and wait for its terminal event."""
    sent = time.perf_counter()
    await ws.send(
        json.dumps(
            {
                "type": "analyze",
                "text": text,
                "analysis": "logit_lens",
                "model_group": group,
                "options": {"k": k},
                "client_request_id": tag,
            }
        )
    )
    request_id: str | None = None
    positions: list[int] = []
    while True:
        left = timeout - (time.perf_counter() - sent)
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout=max(left, 0.001))
        except TimeoutError:
            return Reply(text, "client timeout", time.perf_counter() - sent)
        event = json.loads(raw)
        kind = event.get("type")
        if kind == "queued":
            if event.get("client_request_id") != tag:
                odd.note("queued with another client_request_id")
            if request_id is not None:
                odd.note("queued twice")
            request_id = event.get("request_id")
            positions.append(event.get("position", 0))
            continue
        if request_id is None and kind != "error":
            odd.note(f"{kind} before queued")
        elif request_id is not None and event.get("request_id") not in (request_id, None):
            odd.note(f"{kind} for another request")
            continue
        if kind == "queue_update":
            if positions and event.get("position", 0) > positions[-1]:
                odd.note("queue position went up")
            positions.append(event.get("position", 0))
        if kind in TERMINAL:
            latency = time.perf_counter() - sent
            if kind == "completed" and event.get("status") == "completed":
                result = event.get("result")
                if not isinstance(result, dict) or not result.get("complete", False):
                    return Reply(text, "completed without a full result", latency)
                return Reply(text, "completed", latency, result)
            status = str(event.get("status") or kind)
            return Reply(text, status, latency, message=str(event.get("message", "")))


async def client(
    url: str,
    texts: list[str],
    name: str,
    group: str,
    k: int,
    connected: asyncio.Queue[None],
    start: asyncio.Event,
    odd: Oddities,
    timeout: float,
) -> list[Reply]:
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "connection_established":
            odd.note(f"first message {hello.get('type')!r}, not connection_established")
        connected.put_nowait(None)
        await start.wait()
        return [
            await request(ws, text, f"{name}-{i}", group, k, odd, timeout)
            for i, text in enumerate(texts)
        ]


@dataclass
class Run:
    label: str
    replies: list[Reply]
    wall_s: float
    batches: float
    batched_requests: float
    sizes: str  # batches by size range
    odd: Oddities

    @property
    def completed(self) -> list[Reply]:
        return [r for r in self.replies if r.status == "completed"]

    @property
    def throughput(self) -> float:
        return len(self.completed) / self.wall_s


async def warm_up(url: str, group: str, k: int, timeout: float) -> None:
    """One request on its own connection, before anything is timed."""
    async with websockets.connect(ws_url(url), max_size=None, open_timeout=30) as ws:
        await ws.recv()  # connection_established
        text = "Warm-up: the quick brown fox."
        warm = await request(ws, text, "warm", group, k, Oddities(), timeout)
    if warm.status != "completed":
        raise SystemExit(f"The warm-up request failed: {warm.status} {warm.message}")


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/ws"


async def load(
    url: str, texts: list[str], clients: int, group: str, k: int, timeout: float
) -> tuple[list[Reply], float, Oddities]:
    """``clients`` clients sharing ``texts`` (contiguous slices), started together."""
    odd = Oddities()
    per = len(texts) // clients
    connected: asyncio.Queue[None] = asyncio.Queue()
    start = asyncio.Event()
    tasks = [
        asyncio.create_task(
            client(
                ws_url(url),
                texts[c * per : (c + 1) * per],
                f"c{c}",
                group,
                k,
                connected,
                start,
                odd,
                timeout,
            )
        )
        for c in range(clients)
    ]
    for _ in range(clients):
        await connected.get()
    started = time.perf_counter()
    start.set()
    replies = [reply for chunk in await asyncio.gather(*tasks) for reply in chunk]
    return replies, time.perf_counter() - started, odd


def run_mode(args: argparse.Namespace, texts: list[str], batching: bool) -> Run:
    label = "batching on " if batching else "batching off"
    with live_server(
        batching=batching,
        group=args.group,
        batch_max=args.batch_max,
        queue_size=max(100, 2 * len(texts)),
        cache_dir=args.cache_dir,
        timeout=args.start_timeout,
    ) as url:
        asyncio.run(warm_up(url, args.group, args.k, args.request_timeout))
        before = batch_histogram(url)
        replies, wall, odd = asyncio.run(
            load(url, texts, args.clients, args.group, args.k, args.request_timeout)
        )
        after = batch_histogram(url)
    return Run(
        label,
        replies,
        wall,
        batches=after.get("count", 0.0) - before.get("count", 0.0),
        batched_requests=after.get("sum", 0.0) - before.get("sum", 0.0),
        sizes=batch_sizes(before, after),
        odd=odd,
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(run: Run) -> None:
    latencies = [r.latency_s for r in run.completed]
    p50 = percentile(latencies, 50) * 1000 if latencies else float("nan")
    p95 = percentile(latencies, 95) * 1000 if latencies else float("nan")
    mean_batch = run.batched_requests / run.batches if run.batches else float("nan")
    print(
        f"{run.label}: {len(run.completed)}/{len(run.replies)} completed in "
        f"{run.wall_s:6.2f} s = {run.throughput:6.2f} requests/s; latency p50 {p50:7.0f} ms, "
        f"p95 {p95:7.0f} ms; {run.batches:.0f} batches (mean {mean_batch:.1f} requests; "
        f"by size {run.sizes})"
    )
    failed = Counter(f"{r.status}: {r.message}" for r in run.replies if r.status != "completed")
    for what, n in failed.items():
        print(f"  NOT completed x{n}: {what}")
    for what, n in run.odd.counts.items():
        print(f"  protocol oddity x{n}: {what}")


def top1(result: dict[str, Any]) -> list[list[int]]:
    """(layers, T) top-1 token id at every layer and position."""
    return [[row[0] for row in layer] for layer in result["top_ids"]]


def compare(on: Run, off: Run) -> None:
    """Top-1 ids per layer and position, with batching against without, per text."""
    off_by_text = {r.text: r.result for r in off.completed}
    texts = cells = bad_cells = bad_texts = 0
    for reply in on.completed:
        other = off_by_text.get(reply.text)
        if other is None or reply.result is None:
            continue
        texts += 1
        a, b = top1(reply.result), top1(other)
        if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=False)):
            bad_texts += 1
            bad_cells += sum(len(x) for x in a)
            continue
        diff = sum(x != y for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))
        cells += sum(len(x) for x in a)
        bad_cells += diff
        bad_texts += diff > 0
    print(
        f"results on vs off: {texts} texts compared, {bad_cells} of {cells} (layer, position) "
        f"top-1 ids differ, in {bad_texts} texts"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", default=None, help="model group (default smollm2-135m)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=None, help="default 4")
    parser.add_argument("--k", type=int, default=5, help="top tokens per layer and position")
    parser.add_argument("--batch-max", type=int, default=16, help="TZOO_AUTO_BATCH_SIZE_MAX")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: TZOO_CACHE_DIR")
    parser.add_argument("--off-first", action="store_true", help="run batching off first")
    parser.add_argument(
        "--rounds", type=int, default=1, help="on/off pairs, order alternating; median ratio"
    )
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds for /ready")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds a request")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny-llama, 2 requests per client"
    )
    args = parser.parse_args()
    args.group = args.group or ("tiny-llama" if args.quick else "smollm2-135m")
    args.requests_per_client = args.requests_per_client or (2 if args.quick else 4)
    args.cache_dir = args.cache_dir or get_settings().cache_dir

    texts = workload(args.clients * args.requests_per_client)
    print(
        f"group {args.group}: {args.clients} clients x {args.requests_per_client} logit-lens "
        f"requests (k={args.k}), {len(texts)} different texts; batches of up to "
        f"{args.batch_max}; cache {args.cache_dir}"
    )
    pairs: list[dict[bool, Run]] = []
    for round_ in range(args.rounds):
        on_first = (round_ % 2 == 0) != args.off_first  # alternate the order each round
        runs = {}
        for batching in (True, False) if on_first else (False, True):
            runs[batching] = run_mode(args, texts, batching)
            report(runs[batching])
        pairs.append(runs)
    lengths = sorted(len(r.result["token_ids"]) for r in pairs[0][False].completed if r.result)
    if lengths:
        print(f"tokens per text: {lengths[0]}-{lengths[-1]} (median {lengths[len(lengths) // 2]})")
    ratios = [
        p[True].throughput / p[False].throughput if p[False].throughput else float("nan")
        for p in pairs
    ]
    ratio = statistics.median(ratios)
    met = "met" if ratio >= GOAL else "NOT met"
    each = (
        f" (median of rounds: {', '.join(f'{r:.2f}x' for r in ratios)})" if len(ratios) > 1 else ""
    )
    print(f"throughput ratio on / off: {ratio:.2f}x{each} (goal >= {GOAL:g}x: {met})")
    every = all(len(run.completed) == len(run.replies) for p in pairs for run in p.values())
    print(f"every request completed: {'yes' if every else 'NO'}")
    for p in pairs:
        compare(p[True], p[False])


if __name__ == "__main__":
    main()
