"""Password hashing, CSRF signing, the login limiter and safe redirects."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from tzoo.service.quotas import MemoryQuotas
from tzoo.web import security
from tzoo.web.security import (
    LoginLimiter,
    LoginThrottledError,
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


def limiter_on(clock: FakeClock, **options: float) -> LoginLimiter:
    values = {"failures_per_account": 3, "failures_per_ip": 5, "window_seconds": 60, **options}
    return LoginLimiter(MemoryQuotas(clock=clock), **values)  # type: ignore[arg-type]


def test_limiter_slows_an_account_after_its_failures_with_growing_delays() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, failures_per_ip=100, window_seconds=600)
    for _ in range(3):
        limiter.failed(limiter.begin("ada", "ip"))
    waits = []
    for _ in range(6):
        with pytest.raises(LoginThrottledError) as refused:
            limiter.begin("ada", "ip")
        waits.append(refused.value.retry_after)
        clock.now += refused.value.retry_after
        limiter.failed(limiter.begin("ada", "ip"))
    assert waits == [5, 10, 20, 30, 30, 30]  # doubling, capped at 30 s
    limiter.begin("bob", "ip")  # other accounts from the same address are not slowed
    limiter.begin("ada", "elsewhere")  # nor this account from another address


def test_limiter_forgets_an_account_s_failures_after_success_and_caps_its_memory() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock)
    for _ in range(2):
        limiter.failed(limiter.begin("ada", "ip"))
    limiter.succeeded(limiter.begin("ada", "ip"))
    for _ in range(3):
        limiter.failed(limiter.begin("ada", "ip"))  # three free ones again
    quotas = MemoryQuotas(clock=clock, max_keys=3)
    for key in ("a", "b", "c", "d", "e"):
        quotas.hit(key, 2, 60)
    assert len(quotas) == 3


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
