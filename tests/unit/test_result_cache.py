"""The result cache: LRU + TTL in process, Redis when configured, codec round trip."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest
from tzoo_testing import make_settings

from tzoo.service.result_cache import (
    CachedResult,
    MemoryResultCache,
    NoResultCache,
    RedisResultCache,
    cache_key,
    decode_result,
    encode_result,
    make_result_cache,
    parts_equal,
)


def sample() -> CachedResult:
    rng = np.random.default_rng(0)
    weights = rng.random((4, 6, 6), dtype=np.float32)
    return CachedResult(
        {"tokens": ["a", "<b>"], "n_layers": 2, "head_stats": {"x": [[None, 1.5]]}},
        {"decoder.0": {"attention": weights}, "decoder.0.neurons": {"queries": weights[:, :, :3]}},
    )


def test_encode_decode_round_trip_is_exact() -> None:
    value = sample()
    back = decode_result(encode_result(value))
    assert back.meta == value.meta
    assert parts_equal(back.parts, value.parts)


def test_keys_depend_on_every_input() -> None:
    base = cache_key("attention", "m", text="a", pair=None)
    assert base == cache_key("attention", "m", pair=None, text="a")
    assert base != cache_key("attention", "m", text="b", pair=None)
    assert base != cache_key("attention", "m2", text="a", pair=None)
    assert base != cache_key("attention", "m", text="a", pair="b")


def test_memory_cache_evicts_least_recently_used() -> None:
    cache = MemoryResultCache(max_entries=2, ttl_seconds=60)
    cache.set("a", sample())
    cache.set("b", sample())
    assert cache.get("a") is not None  # a is now the most recently used
    cache.set("c", sample())
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_memory_cache_expires_entries() -> None:
    now = [1000.0]
    cache = MemoryResultCache(max_entries=4, ttl_seconds=10, clock=lambda: now[0])
    cache.set("a", sample())
    now[0] += 9
    assert cache.get("a") is not None
    now[0] += 2
    assert cache.get("a") is None and len(cache) == 0


def test_settings_choose_the_cache(tmp_path) -> None:
    assert isinstance(make_result_cache(make_settings(tmp_path)), MemoryResultCache)
    assert isinstance(
        make_result_cache(make_settings(tmp_path, result_cache_ttl_seconds=0)), NoResultCache
    )
    redis_settings = make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")
    assert isinstance(make_result_cache(redis_settings), RedisResultCache)


def test_unreachable_redis_degrades_to_recomputing() -> None:
    cache = RedisResultCache("redis://127.0.0.1:1/0", ttl_seconds=60)
    cache.set("k", sample())  # logs, does not raise
    assert cache.get("k") is None


def redis_url() -> str:
    url = os.environ.get("TZOO_TEST_REDIS_URL")
    if url:
        return url
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("TZOO_TEST_REDIS_URL must be set on CI: Redis tests may not skip")
    pytest.skip("Redis tests need TZOO_TEST_REDIS_URL, e.g. redis://127.0.0.1:6379/0")


@pytest.mark.redis
def test_redis_cache_round_trip_and_ttl() -> None:
    cache = RedisResultCache(redis_url(), ttl_seconds=30)
    key = f"tzoo:test:{secrets.token_hex(8)}"
    try:
        assert cache.get(key) is None
        cache.set(key, sample())
        got = cache.get(key)
        assert (
            got is not None and got.meta == sample().meta and parts_equal(got.parts, sample().parts)
        )
        assert 0 < cache._client.ttl(key) <= 30
    finally:
        cache._client.delete(key)
