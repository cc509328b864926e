"""A per-client sliding-window rate limit (TZOO_RATE_LIMIT_PER_MINUTE).

In-process: each server process counts on its own, so N processes allow N times the rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0
# Clients not seen for a window are forgotten, so the table cannot grow without bound.
_SWEEP_EVERY = 1024


class RateLimitedError(RuntimeError):
    def __init__(self, limit: int, retry_after: float) -> None:
        self.limit = limit
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(
            f"Too many requests: the limit is {limit} a minute per client; try again in "
            f"{self.retry_after} s."
        )


class RateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}
        self._calls = 0

    def check(self, client: str) -> None:
        """Count one request of ``client``, or raise RateLimitedError (not counted) when
        it has made ``per_minute`` in the last minute. A limit of 0 is no limit."""
        if self.per_minute <= 0:
            return
        now = self._clock()
        with self._lock:
            self._calls += 1
            if self._calls % _SWEEP_EVERY == 0:
                self._sweep(now)
            hits = self._hits.setdefault(client, deque())
            while hits and hits[0] <= now - WINDOW_SECONDS:
                hits.popleft()
            if len(hits) >= self.per_minute:
                raise RateLimitedError(self.per_minute, hits[0] + WINDOW_SECONDS - now)
            hits.append(now)

    def _sweep(self, now: float) -> None:
        stale = [
            c for c, hits in self._hits.items() if not hits or hits[-1] <= now - WINDOW_SECONDS
        ]
        for client in stale:
            del self._hits[client]
