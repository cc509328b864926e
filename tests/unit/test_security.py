"""Password hashing, CSRF signing, the login limiter and safe redirects."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from tzoo.web import security
from tzoo.web.security import (
    LoginLimiter,
    PasswordRuleError,
    check_new_password,
    hash_password,
    needs_rehash,
    nonce_from_cookie,
    safe_next,
    sign_csrf_nonce,
    tokens_match,
    verify_password,
)

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture(autouse=True)
def _cheap_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "PASSWORD_HASHER", CHEAP)


def test_password_hash_is_salted_argon2id_and_verifies() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first.startswith("$argon2id$") and "correct horse" not in first
    assert first != second  # a fresh salt each time
    assert verify_password(first, "correct horse")
    assert not verify_password(first, "correct horsE")
    assert not verify_password("not a hash", "correct horse")


def test_rehash_is_needed_when_the_parameters_change(monkeypatch: pytest.MonkeyPatch) -> None:
    old = hash_password("correct horse")
    assert not needs_rehash(old)
    monkeypatch.setattr(
        security, "PASSWORD_HASHER", PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    )
    assert needs_rehash(old)
    assert verify_password(old, "correct horse")  # the old hash still verifies
    assert not needs_rehash(hash_password("correct horse"))


@pytest.mark.parametrize("password", ["", "short77", "x" * 257])
def test_new_passwords_must_be_8_to_256_characters(password: str) -> None:
    with pytest.raises(PasswordRuleError, match="8 to 256"):
        check_new_password(password)


def test_eight_and_256_character_passwords_are_accepted() -> None:
    check_new_password("x" * 8)
    check_new_password("x" * 256)


def test_signed_csrf_cookie_round_trips_and_refuses_forgeries() -> None:
    cookie = sign_csrf_nonce("abc123", "secret")
    assert nonce_from_cookie(cookie, "secret") == "abc123"
    assert nonce_from_cookie(cookie, "another secret") is None
    assert nonce_from_cookie("abc124" + cookie[6:], "secret") is None
    flipped = cookie[:-1] + ("0" if cookie[-1] != "0" else "1")
    assert nonce_from_cookie(flipped, "secret") is None
    assert nonce_from_cookie(cookie[:-2], "secret") is None
    for malformed in (None, "", "no-dot", "."):
        assert nonce_from_cookie(malformed, "secret") is None


def test_missing_tokens_never_match() -> None:
    assert tokens_match("a", "a")
    assert not tokens_match("a", "b")
    assert not tokens_match(None, None)
    assert not tokens_match("", "")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_blocks_after_max_failures_until_the_window_passes() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(max_failures=3, window_seconds=60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("ip|ada") is None
        limiter.failed("ip|ada")
        clock.now += 1
    wait = limiter.retry_after("ip|ada")
    assert wait is not None and 55 <= wait <= 60
    assert limiter.retry_after("ip|bob") is None
    clock.now += wait
    assert limiter.retry_after("ip|ada") is None


def test_limiter_forgets_a_key_after_success_and_caps_its_memory() -> None:
    limiter = LoginLimiter(max_failures=2, window_seconds=60, max_keys=3, clock=FakeClock())
    limiter.failed("a")
    limiter.succeeded("a")
    limiter.failed("a")
    assert limiter.retry_after("a") is None
    for key in ("b", "c", "d", "e"):
        limiter.failed(key)
    assert len(limiter._failures) == 3


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/viz/abc?view=head#x", "/viz/abc?view=head#x"),
        ("/", "/"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("\\\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("evil.example", "/"),
        ("/\tevil", "/"),
        ("/%0d%0aSet-Cookie:x", "/%0d%0aSet-Cookie:x"),
    ],
)
def test_safe_next_keeps_only_local_paths(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected
