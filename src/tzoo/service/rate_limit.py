"""A per-client sliding-window rate limit (TZOO_RATE_LIMIT_PER_MINUTE) for lens requests.

Counted by ``service.quotas``: in this process's memory by default (each server process
then counts on its own, so N processes allow N times the rate), or in Redis, shared by
every process, when the app passes its Redis-backed quotas.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tzoo.service.quotas import MemoryQuotas, QuotaExceededError, Quotas, seconds_to_wait

WINDOW_SECONDS = 60.0


class RateLimitedError(QuotaExceededError):
    def __init__(self, limit: int, retry_after: float) -> None:
        self.limit = limit
        wait = seconds_to_wait(retry_after)
        super().__init__(
            f"Too many requests: the limit is {limit} a minute per client; try again in {wait} s.",
            wait,
        )


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        quotas: Quotas | None = None,
    ) -> None:
        self.per_minute = per_minute
        self.quotas = quotas if quotas is not None else MemoryQuotas(clock=clock)

    def check(self, client: str) -> None:
        """Count one request of ``client``, or raise RateLimitedError (not counted) when
        it has made ``per_minute`` in the last minute. A limit of 0 is no limit."""
        if self.per_minute <= 0:
            return
        wait = self.quotas.hit(f"lens:{client}", self.per_minute, WINDOW_SECONDS)
        if wait is not None:
            raise RateLimitedError(self.per_minute, wait)
