"""A cache of computed results keyed by (analysis, model, input, params).

Redis when ``TZOO_REDIS_URL`` is set (shared by every worker process), otherwise an
in-process LRU. Values are a JSON document plus named groups of arrays, encoded with the
store's codec (never pickle: a shared Redis must not be able to run code in us).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from loguru import logger

from tzoo.store.codec import decode_arrays, encode_arrays

Parts = dict[str, dict[str, np.ndarray]]
_MAGIC = b"TZRC1"


@dataclass(frozen=True)
class CachedResult:
    meta: dict[str, Any]
    parts: Parts


class ResultCache(Protocol):
    def get(self, key: str) -> CachedResult | None: ...
    def set(self, key: str, value: CachedResult) -> None: ...


def cache_key(kind: str, model: str, **inputs: Any) -> str:
    """A stable key: the same analysis of the same input with the same params."""
    document = json.dumps({"kind": kind, "model": model, **inputs}, sort_keys=True)
    return f"tzoo:result:{kind}:" + hashlib.sha256(document.encode()).hexdigest()


def encode_result(value: CachedResult) -> bytes:
    """Header (JSON: meta and the byte length of each part) + the codec blob of each part."""
    blobs = {
        name: encode_arrays(arrays, precision="float32") for name, arrays in value.parts.items()
    }
    header = json.dumps(
        {"meta": value.meta, "parts": {n: len(b) for n, b in blobs.items()}}
    ).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs.values())


def decode_result(data: bytes) -> CachedResult:
    if not data.startswith(_MAGIC):
        raise ValueError("not a cached result")
    offset = len(_MAGIC) + 4
    (header_len,) = struct.unpack("<I", data[len(_MAGIC) : offset])
    header = json.loads(data[offset : offset + header_len])
    offset += header_len
    parts: Parts = {}
    for name, length in header["parts"].items():
        parts[name] = decode_arrays(data[offset : offset + length])
        offset += length
    return CachedResult(header["meta"], parts)


class MemoryResultCache:
    """In-process LRU with a time-to-live; thread-safe."""

    def __init__(
        self, max_entries: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedResult]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedResult | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, value = entry
            if self._clock() - stored_at > self.ttl_seconds:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def set(self, key: str, value: CachedResult) -> None:
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class RedisResultCache:
    """Shared cache in Redis. A Redis outage degrades to recomputing, never to an error."""

    def __init__(self, url: str, ttl_seconds: int) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.ttl_seconds = ttl_seconds

    def get(self, key: str) -> CachedResult | None:
        try:
            data = self._client.get(key)
        except Exception as exc:  # redis.RedisError, OSError
            logger.warning("Result cache unavailable ({}); computing instead", exc)
            return None
        if not isinstance(data, bytes):
            return None
        try:
            return decode_result(data)
        except ValueError:
            return None

    def set(self, key: str, value: CachedResult) -> None:
        try:
            self._client.set(key, encode_result(value), ex=self.ttl_seconds)
        except Exception as exc:
            logger.warning("Result cache unavailable ({}); not cached", exc)


class NoResultCache:
    def get(self, key: str) -> CachedResult | None:
        return None

    def set(self, key: str, value: CachedResult) -> None:
        return None


def make_result_cache(settings: Any) -> ResultCache:
    """The cache the settings ask for: none (ttl 0), Redis (URL set) or in-process."""
    if settings.result_cache_ttl_seconds == 0:
        return NoResultCache()
    if settings.redis_url:
        return RedisResultCache(settings.redis_url, settings.result_cache_ttl_seconds)
    return MemoryResultCache(settings.result_cache_max_entries, settings.result_cache_ttl_seconds)


def parts_equal(
    a: Mapping[str, Mapping[str, np.ndarray]], b: Mapping[str, Mapping[str, np.ndarray]]
) -> bool:
    """True when both hold the same part names, array names and values (for tests)."""
    if a.keys() != b.keys():
        return False
    return all(
        a[n].keys() == b[n].keys() and all(np.array_equal(a[n][k], b[n][k]) for k in a[n])
        for n in a
    )
