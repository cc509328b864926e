"""Sliding-window counters behind every per-client limit (lens requests, logins, sign-ups,
visualizations): one primitive, kept in process memory or in Redis.

A counter is the set of timestamped *hits* under a key. ``hit(key, limit, window_s)``
counts one more hit unless ``limit`` hits already lie within the last ``window_s``
seconds, and says how long to wait otherwise; ``hit_spaced`` lets ``free`` hits through
and then asks each further one to wait an exponentially growing delay after the previous
one. Each is one atomic step — check and count together — so N parallel callers can
never all see "one left" and all pass: with a limit of 10, 20 parallel hits give exactly
10 passes. A hit is named by a ``member`` so a caller can reserve before doing the work
and ``give_back`` the reservation when the work turns out not to count (a login with the
right password, a sign-up refused for a taken name).

Backends:
- ``MemoryQuotas``: dicts under a ``threading.Lock``; each server process counts alone.
  Keys whose hits all left their window are swept, and at most ``max_keys`` are kept (the
  least recently used go first), so a flood of new keys cannot exhaust memory.
- ``RedisQuotas`` (``TZOO_REDIS_URL``): a sorted set per key (score: the hit's time in
  ms), changed only by Lua scripts (``ZREMRANGEBYSCORE`` + ``ZCARD`` + ``ZADD`` +
  ``PEXPIRE``, run atomically by Redis), so every process sharing the Redis shares the
  limits, on Redis's clock. Keys expire with their window. If Redis cannot be reached,
  the counters fall back to this process's memory (limits still hold, per process) and
  say so in the log.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from loguru import logger

KEY_PREFIX = "tzoo:quota:"
_SWEEP_EVERY = 1024  # calls between sweeps of stale keys (memory backend)
_WARN_EVERY_S = 60.0  # at most one "Redis unavailable" warning a minute


class QuotaExceededError(RuntimeError):
    """A per-client limit is reached: answered 429 with ``Retry-After: retry_after``."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = seconds_to_wait(retry_after)
        super().__init__(message)


def seconds_to_wait(wait: float) -> int:
    """A wait as a Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait))


def spacing_delay(n: int, free: int, first_delay_s: float, max_delay_s: float) -> float:
    """The wait ``hit_spaced`` asks for after ``n`` hits in the window: none below ``free``,
    then ``first_delay_s`` doubling per hit beyond ``free``, at most ``max_delay_s``."""
    if n <= 0 or n < free:
        return 0.0
    exponent = min(n - free, 62)  # 2**62 s is past any cap; keeps the float finite
    return float(min(max_delay_s, first_delay_s * 2.0**exponent))


def new_member() -> str:
    return secrets.token_hex(8)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"A limit is at least 1 (None: count without one); got {limit}.")


class Quotas(ABC):
    """Sliding-window counters (see the module docstring). Keys are plain strings chosen
    by the caller, e.g. ``login:ip:10.0.0.7``; windows and delays are in seconds."""

    @abstractmethod
    def hit(
        self, key: str, limit: int | None, window_s: float, *, member: str | None = None
    ) -> int | None:
        """Count one hit of ``key`` (named ``member``) and return None; or, when ``limit``
        hits lie within the last ``window_s`` s, count nothing and return the seconds
        until the oldest leaves the window. ``limit`` None: always count (a tally)."""

    @abstractmethod
    def hit_spaced(
        self,
        key: str,
        *,
        free: int,
        window_s: float,
        first_delay_s: float,
        max_delay_s: float,
        member: str | None = None,
    ) -> int | None:
        """Count one hit of ``key`` and return None, unless ``n`` hits (``n >= free``,
        ``n >= 1``) lie within the window and the latest is younger than
        ``spacing_delay(n, ...)``: then count nothing and return the seconds left."""

    @abstractmethod
    def count(self, key: str, window_s: float) -> int:
        """How many hits of ``key`` lie within the last ``window_s`` seconds."""

    @abstractmethod
    def give_back(self, key: str, member: str) -> None:
        """Forget the hit ``member`` of ``key`` (a reservation that did not count)."""

    @abstractmethod
    def clear(self, key: str) -> None:
        """Forget every hit of ``key``."""

    def take(self, key: str, limit: int | None, window_s: float, *, refusal: str) -> str:
        """Count one hit and return its member, or raise QuotaExceededError with
        ``refusal`` (``{retry_after}`` in it is filled in)."""
        member = new_member()
        wait = self.hit(key, limit, window_s, member=member)
        if wait is not None:
            raise QuotaExceededError(refusal.format(retry_after=wait), wait)
        return member

    @contextmanager
    def charge(
        self, key: str, limit: int | None, window_s: float, *, refusal: str
    ) -> Iterator[None]:
        """Reserve one hit for the block (QuotaExceededError when there is none left) and
        give it back if the block raises: only work that succeeded is counted."""
        member = self.take(key, limit, window_s, refusal=refusal)
        try:
            yield
        except BaseException:
            self.give_back(key, member)
            raise


class MemoryQuotas(Quotas):
    """Counters in this process's memory, under one lock."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self._clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # key -> (window of its latest hit, hits as (time, member), oldest first)
        self._hits: OrderedDict[str, tuple[float, deque[tuple[float, str]]]] = OrderedDict()
        self._calls = 0

    def hit(
        self, key: str, limit: int | None, window_s: float, *, member: str | None = None
    ) -> int | None:
        _check_limit(limit)
        with self._lock:
            now = self._clock()
            hits = self._recent(key, window_s, now)
            if limit is not None and len(hits) >= limit:
                return seconds_to_wait(hits[0][0] + window_s - now)
            self._add(key, window_s, hits, now, member)
            return None

    def hit_spaced(
        self,
        key: str,
        *,
        free: int,
        window_s: float,
        first_delay_s: float,
        max_delay_s: float,
        member: str | None = None,
    ) -> int | None:
        with self._lock:
            now = self._clock()
            hits = self._recent(key, window_s, now)
            delay = spacing_delay(len(hits), free, first_delay_s, max_delay_s)
            if delay > 0 and hits[-1][0] + delay > now:
                return seconds_to_wait(hits[-1][0] + delay - now)
            self._add(key, window_s, hits, now, member)
            return None

    def count(self, key: str, window_s: float) -> int:
        with self._lock:
            entry = self._hits.get(key)
            if entry is None:
                return 0
            cutoff = self._clock() - window_s
            return sum(1 for when, _ in entry[1] if when > cutoff)

    def give_back(self, key: str, member: str) -> None:
        with self._lock:
            entry = self._hits.get(key)
            if entry is None:
                return
            for item in entry[1]:
                if item[1] == member:
                    entry[1].remove(item)
                    break

    def clear(self, key: str) -> None:
        with self._lock:
            self._hits.pop(key, None)

    def __len__(self) -> int:
        return len(self._hits)

    # -- under the lock -------------------------------------------------------------------
    def _recent(self, key: str, window_s: float, now: float) -> deque[tuple[float, str]]:
        entry = self._hits.get(key)
        if entry is None:
            return deque()
        hits = entry[1]
        while hits and hits[0][0] <= now - window_s:
            hits.popleft()
        return hits

    def _add(
        self,
        key: str,
        window_s: float,
        hits: deque[tuple[float, str]],
        now: float,
        member: str | None,
    ) -> None:
        hits.append((now, member or new_member()))
        self._hits[key] = (window_s, hits)
        self._hits.move_to_end(key)
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep(now)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)

    def _sweep(self, now: float) -> None:
        stale = [
            key
            for key, (window, hits) in self._hits.items()
            if not hits or hits[-1][0] <= now - window
        ]
        for key in stale:
            del self._hits[key]


# Every script reads the time from Redis itself, so every process shares one clock.
# (replicate_commands: Redis < 7 otherwise refuses writes after the non-deterministic TIME.)
_NOW = """
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
"""

# KEYS[1]: the sorted set; ARGV: window (ms), limit (-1: none), member.
# Returns -1 when counted, else the ms to wait (rounded down: Python rounds seconds up).
_HIT_SCRIPT = (
    _NOW
    + """
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if limit >= 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.floor(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window))
return -1
"""
)

# KEYS[1]: the sorted set; ARGV: window, free, first delay, max delay (ms), member.
_SPACED_SCRIPT = (
    _NOW
    + """
local window = tonumber(ARGV[1])
local free = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n >= 1 and n >= free then
  local delay = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ math.min(n - free, 62))
  local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local wait = tonumber(latest[2]) + delay - now
  if wait > 0 then
    return math.floor(wait)
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil(window))
return -1
"""
)

# KEYS[1]: the sorted set; ARGV: window (ms). Returns the hits within the window.
_COUNT_SCRIPT = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')
"""
)


class RedisQuotas(Quotas):
    """Counters shared through Redis (see the module docstring); times are Redis's own
    clock, so servers with skewed clocks still agree."""

    def __init__(
        self, url: str, *, prefix: str = KEY_PREFIX, fallback: Quotas | None = None
    ) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._hit = self._client.register_script(_HIT_SCRIPT)
        self._spaced = self._client.register_script(_SPACED_SCRIPT)
        self._count = self._client.register_script(_COUNT_SCRIPT)
        self.prefix = prefix
        self.fallback = fallback or MemoryQuotas()
        self._warned_at = -math.inf

    def hit(
        self, key: str, limit: int | None, window_s: float, *, member: str | None = None
    ) -> int | None:
        _check_limit(limit)
        args: list[float | str] = [
            window_s * 1000,
            -1 if limit is None else limit,
            member or new_member(),
        ]
        try:
            wait = self._hit(keys=[self.prefix + key], args=args)
        except Exception as error:  # redis.RedisError, OSError
            self._warn(error)
            return self.fallback.hit(key, limit, window_s, member=member)
        return None if int(wait) < 0 else seconds_to_wait(int(wait) / 1000)

    def hit_spaced(
        self,
        key: str,
        *,
        free: int,
        window_s: float,
        first_delay_s: float,
        max_delay_s: float,
        member: str | None = None,
    ) -> int | None:
        args: list[float | str] = [
            window_s * 1000,
            free,
            first_delay_s * 1000,
            max_delay_s * 1000,
            member or new_member(),
        ]
        try:
            wait = self._spaced(keys=[self.prefix + key], args=args)
        except Exception as error:
            self._warn(error)
            return self.fallback.hit_spaced(
                key,
                free=free,
                window_s=window_s,
                first_delay_s=first_delay_s,
                max_delay_s=max_delay_s,
                member=member,
            )
        return None if int(wait) < 0 else seconds_to_wait(int(wait) / 1000)

    def count(self, key: str, window_s: float) -> int:
        try:
            return int(self._count(keys=[self.prefix + key], args=[window_s * 1000]))
        except Exception as error:
            self._warn(error)
            return self.fallback.count(key, window_s)

    def give_back(self, key: str, member: str) -> None:
        try:
            self._client.zrem(self.prefix + key, member)
        except Exception as error:
            self._warn(error)
        self.fallback.give_back(key, member)

    def clear(self, key: str) -> None:
        try:
            self._client.delete(self.prefix + key)
        except Exception as error:
            self._warn(error)
        self.fallback.clear(key)

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            logger.warning("Redis unavailable for limits ({}); counting in this process", error)


TOO_MANY_VISUALIZATIONS = (
    "Too many visualizations: the limit is {limit} a minute per client "
    "(TZOO_VISUALIZATIONS_PER_MINUTE); try again in {{retry_after}} s."
)


def charge_visualization(
    quotas: Quotas, per_minute: int, client: str
) -> AbstractContextManager[None]:
    """One of ``client``'s ``per_minute`` visualizations (attention views and graphs
    together; 0: no limit) for the block that creates it; refused with
    QuotaExceededError, given back when the creation fails."""
    return quotas.charge(
        f"visualizations:{client}",
        per_minute or None,
        60,
        refusal=TOO_MANY_VISUALIZATIONS.format(limit=per_minute),
    )


def make_quotas(settings: Any) -> Quotas:
    """Redis counters when ``settings.redis_url`` is set, else this process's memory."""
    if settings.redis_url:
        return RedisQuotas(settings.redis_url)
    return MemoryQuotas()


__all__ = [
    "MemoryQuotas",
    "QuotaExceededError",
    "Quotas",
    "RedisQuotas",
    "charge_visualization",
    "make_quotas",
    "seconds_to_wait",
    "spacing_delay",
]
