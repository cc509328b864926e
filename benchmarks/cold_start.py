"""Cold start of smollm2-135m: first load (GGUF -> safetensors conversion) vs cached load.

Both loads run in fresh processes over the same, initially empty cache directory, so no
in-process memo helps the second one; each process reports its model-load time (after
imports) and we also print the whole process time. Goal: load-time ratio >= 10.

    .venv/bin/python benchmarks/cold_start.py [--model smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
from tzoo.config import Settings
from tzoo.runtime.manager import ModelManager
settings = Settings(cache_dir=sys.argv[1], data_dir=sys.argv[1] + "/data")
manager = ModelManager(settings)
started = time.perf_counter()
handle = manager.get(sys.argv[2])
print(json.dumps({"load_s": time.perf_counter() - started, "size": handle.size_bytes}))
"""


def timed_load(cache: Path, model: str) -> tuple[float, float]:
    """(model-load seconds inside the process, whole process seconds)."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache), model],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["load_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to take the median of")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tzoo-bench-") as tmp:
        cache = Path(tmp)
        first_load, first_wall = timed_load(cache, args.model)
        cached = [timed_load(cache, args.model) for _ in range(args.repeats)]
    cached_load = statistics.median(c[0] for c in cached)
    cached_wall = statistics.median(c[1] for c in cached)
    print(f"model: {args.model}")
    print(f"first load (converts GGUF):  {first_load:7.2f} s   (process {first_wall:6.2f} s)")
    print(
        f"cached load (median of {args.repeats}):  {cached_load:7.2f} s   (process {cached_wall:6.2f} s)"
    )
    print(f"ratio first/cached, load time:    {first_load / cached_load:6.1f}x  (goal >= 10)")
    print(f"ratio first/cached, process time: {first_wall / cached_wall:6.1f}x")


if __name__ == "__main__":
    main()
