"""Token-wheel sessions: a prompt, the token ids appended to it, and the model's key/value
cache, kept between requests so that each step costs one token's forward pass.

A session keeps:

- ``prompt_ids`` (tokenised once) and one ``Step`` per appended id. Appended tokens are ids,
  never text, so nothing is re-tokenised and earlier tokens never shift.
- the model's key/value cache of the whole context (a transformers ``DynamicCache``):
  appending runs the model on the one new token; undo crops the cache.
- the last-position logits (V,) float32 of the prompt and of the latest
  ``logit_history`` contexts, so an undo within that history costs no forward pass; an
  older undo crops one token further and runs that token again.

Forward passes hold the model handle's lock: hooks of other analyses may sit on the shared
model. Each session has a lock of its own, so requests on one session run one at a time
while sessions on the same model stay independent (their own cache objects).

``SessionStore`` owns the live sessions: ids are UUID4 strings, an idle session expires
after ``wheel_session_ttl_seconds`` and ``run_cleanup_loop`` sweeps them every
``wheel_cleanup_interval_seconds``; the number of sessions and the length of a context
are capped by settings.

Limits that hold against one greedy client:

- Each session belongs to its creator. It has a random ``key`` (returned once, at
  creation); ``SessionStore.get_owned`` opens a session only for that key (compared in
  constant time) or for the signed-in account that created it, and answers anyone else
  exactly as for an unknown id, so a leaked id reveals nothing.
- One client (an account, or an address) may hold ``wheel_sessions_per_client`` sessions,
  all clients together ``wheel_max_sessions``; more get TooManySessionsError, whose
  ``retry_after`` says when the oldest idle one would expire.
- A session pins its model in the ModelManager (no eviction, no unload under it: 409)
  and reserves its key/value cache and kept logits in the memory budget before each
  forward pass that grows them (an estimate from the model's shape, corrected after
  the pass by measuring). A growth that does not fit is refused with MemoryBudgetError.
- Delete and expiry close a session: the cache and logits are dropped, the pin and the
  reservation released, and the freed heap pages handed back to the system.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import inspect
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import numpy as np
import torch
from loguru import logger

from tzoo.analyses.next_token import (
    InvalidSamplingError,
    Sampling,
    check_threshold,
    sample_other,
    shaped_probabilities,
    token_text,
    wheel_segments,
)
from tzoo.config import Settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager, return_freed_memory

CONTEXT_LIMIT_SETTING = "TZOO_WHEEL_MAX_CONTEXT_TOKENS"
SESSIONS_LIMIT_SETTING = "TZOO_WHEEL_MAX_SESSIONS"
PER_CLIENT_SETTING = "TZOO_WHEEL_SESSIONS_PER_CLIENT"
HOLDER_KIND = "token-wheel session"  # how the model manager names a session's pin
LOGIT_HISTORY = 16  # earlier last-position logit vectors kept (besides the prompt's)
Choice = Literal["token", "other"]
Clock = Callable[[], float]

P = ParamSpec("P")
R = TypeVar("R")


# -- errors ----------------------------------------------------------------------------------


class SessionNotFoundError(LookupError):
    """No live session has this id (never created, deleted, or expired), or the caller
    does not hold its key: the same answer for both, so it reveals nothing. HTTP 404."""

    def __init__(self, session_id: str, ttl_seconds: int) -> None:
        shown = session_id if len(session_id) <= 64 else session_id[:64] + "…"
        super().__init__(
            f"No session {shown}; it may have expired after {_duration(ttl_seconds)} idle."
        )
        self.session_id = session_id


class TooManySessionsError(RuntimeError):
    """The most live sessions allowed already exist. HTTP 429 with Retry-After:
    ``retry_after`` seconds, until the oldest idle session would expire."""

    def __init__(self, limit: int, ttl_seconds: int, retry_after: float | None = None) -> None:
        super().__init__(
            f"There are already {limit} token-wheel sessions, the most allowed "
            f"({SESSIONS_LIMIT_SETTING}); delete one or try again when an idle one has "
            f"expired (after {_duration(ttl_seconds)})."
        )
        self.limit = limit
        self.retry_after = _seconds(ttl_seconds if retry_after is None else retry_after)


class TooManyClientSessionsError(TooManySessionsError):
    """This client (account or address) already holds its most sessions. HTTP 429 with
    Retry-After: ``retry_after`` seconds, until its oldest idle session would expire."""

    def __init__(self, limit: int, ttl_seconds: int, retry_after: float) -> None:
        RuntimeError.__init__(
            self,
            f"You already have {limit} token-wheel sessions, the most one client may hold "
            f"({PER_CLIENT_SETTING}); delete one you no longer use (the wheel page deletes "
            f"its old session when you start a new one), or try again in "
            f"{_duration(_seconds(retry_after))}, when your oldest idle one expires.",
        )
        self.limit = limit
        self.retry_after = _seconds(retry_after)


class ContextTooLongError(ValueError):
    """The context would exceed the longest allowed. HTTP 413."""

    def __init__(self, n_tokens: int, limit: int, source: str = CONTEXT_LIMIT_SETTING) -> None:
        super().__init__(
            f"The context would be {n_tokens} tokens; the limit is {limit} ({source})."
        )
        self.n_tokens = n_tokens
        self.limit = limit
        self.source = source


class NotCausalModelError(ValueError):
    """The model cannot predict a next token (an encoder, or no language-model head). 422."""


def _duration(seconds: int) -> str:
    if seconds % 60:
        return f"{seconds} second{'s' * (seconds != 1)}"
    minutes = seconds // 60
    return f"{minutes} minute{'s' * (minutes != 1)}"


def _seconds(wait: float) -> int:
    """A wait as whole seconds for Retry-After: rounded up, at least 1."""
    return max(1, math.ceil(wait))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


# -- steps -----------------------------------------------------------------------------------


@dataclass
class Step:
    """One appended token, with the wheel that was shown when it was chosen."""

    token_id: int
    text: str
    probability: float  # under the shaped distribution shown when it was chosen
    choice: Choice
    sampling: dict[str, float | int]  # the parameters that were applied
    threshold: float
    wheel: dict[str, Any]  # wheel_segments as shown, for replay
    seed: int | None = None  # the seed of an "other" draw, if one was given

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _locked(
    method: Callable[Concatenate[WheelSession, P], R],
) -> Callable[Concatenate[WheelSession, P], R]:
    """Run ``method`` holding the session's lock; SessionNotFoundError once it is closed
    (a request that fetched the session just before another deleted it)."""

    @functools.wraps(method)
    def wrapper(self: WheelSession, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            if self.closed:
                raise SessionNotFoundError(self.id, self.ttl_seconds)
            return method(self, *args, **kwargs)

    return wrapper


# -- the model -------------------------------------------------------------------------------


def check_causal(handle: ModelHandle) -> None:
    """NotCausalModelError unless ``handle`` is a decoder with a language-model head."""
    if handle.architecture != "decoder":
        raise NotCausalModelError(
            f"The token wheel needs a decoder (causal) model; {handle.name} is an "
            f"{handle.architecture}."
        )
    if handle.model.get_output_embeddings() is None:
        raise NotCausalModelError(
            f"The token wheel needs a decoder (causal) model with a language-model head; "
            f"{handle.name} has none."
        )


def model_context_limit(handle: ModelHandle) -> int | None:
    """The longest context the model's positions allow, when its config says."""
    config = handle.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _croppable(cache: Any) -> bool:
    """Whether ``cache`` can be cropped back exactly (a transformers Cache that says so)."""
    if cache is None or not hasattr(cache, "crop") or not hasattr(cache, "get_seq_length"):
        return False
    return bool(getattr(cache, "is_croppable", True))


def kv_bytes_per_token(handle: ModelHandle) -> int:
    """Bytes one token adds to the key/value cache: keys and values of every layer's
    key/value heads (an estimate from the config; sessions correct it by measuring)."""
    try:
        head_dim = getattr(handle.config, "head_dim", None) or handle.d_model // handle.n_heads
        itemsize = torch.empty((), dtype=handle.dtype).element_size()
        return int(2 * handle.n_layers * handle.n_kv_heads * int(head_dim) * itemsize)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 0


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a cache, counting each storage once (a
    cropped layer is a view that still holds its old storage until the next append)."""
    tensors = [
        getattr(layer, name, None)
        for layer in getattr(cache, "layers", None) or []
        for name in ("keys", "values")
    ]
    # transformers 4.x keeps two lists instead of layer objects
    tensors += [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


# -- sessions --------------------------------------------------------------------------------


class WheelSession:
    """One user's token wheel on one model. Public methods are thread-safe."""

    def __init__(
        self,
        manager: ModelManager,
        handle: ModelHandle,
        *,
        max_context_tokens: int,
        ttl_seconds: int,
        clock: Clock = time.time,
        logit_history: int = LOGIT_HISTORY,
        session_id: str | None = None,
        client: str | None = None,
        owner: str | None = None,
    ) -> None:
        self.id = session_id or str(uuid.uuid4())
        # The secret that opens the session (given to its creator once); only its digest
        # is compared, in constant time.
        self.key = secrets.token_urlsafe(32)
        self._key_digest = key_digest(self.key)
        self.client = client  # who it counts against: "user:7", "ip:203.0.113.9", None
        self.owner = owner  # the signed-in account that may open it without the key
        self.holder = f"wheel:{self.id}"  # its name in the model manager
        self.closed = False
        self.model_name = handle.name
        self.prompt = ""
        self.prompt_ids: list[int] = []
        self.steps: list[Step] = []
        self.created_at = self.last_used = clock()
        self.lock = threading.RLock()
        self.ttl_seconds = ttl_seconds
        self._manager = manager
        self._tokenizer = handle.tokenizer
        self._vocab_size = handle.vocab_size or len(handle.tokenizer)
        self._limit, self._limit_source = _context_limit(handle, max_context_tokens)
        self._history = max(0, logit_history)
        self._cache: Any = None  # covers context_ids()[: cache length]
        self._logits: dict[int, np.ndarray] = {}  # context length -> last logits (V,) float32
        self._token_bytes = kv_bytes_per_token(handle)  # measured after each pass

    # -- who may open it ---------------------------------------------------------------------
    def allows(self, key: str | None, account: str | None) -> bool:
        """Whether a caller holding ``key``, signed in as ``account``, may use this session:
        the right key, or the account that created it. Constant time in the key."""
        key_ok = hmac.compare_digest(key_digest(key or ""), self._key_digest)
        return key_ok or (self.owner is not None and account == self.owner)

    def close(self) -> None:
        """Drop the cache and logits and give back the model pin and the reservation
        (waits for a request running on the session to finish)."""
        with self.lock:
            self.closed = True
            self._cache = None
            self._logits = {}
        self._manager.release(self.holder)

    # -- state -------------------------------------------------------------------------------
    def touch(self, now: float) -> None:
        self.last_used = now

    @property
    def expires_at(self) -> float:
        return self.last_used + self.ttl_seconds

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (for decoding; the session never re-tokenises steps)."""
        return self._tokenizer

    @_locked
    def context_ids(self) -> list[int]:
        return self.prompt_ids + [step.token_id for step in self.steps]

    @_locked
    def set_prompt(self, prompt: str) -> None:
        """Tokenise ``prompt`` once (with the special tokens the model expects, e.g. a BOS)
        and start over from it: no steps, a fresh cache."""
        ids = list(self._tokenizer(prompt, add_special_tokens=True)["input_ids"])
        self.set_prompt_ids(ids, prompt=prompt)

    @_locked
    def set_prompt_ids(self, ids: Sequence[int], *, prompt: str | None = None) -> None:
        """Start over from prompt token ids (``prompt`` text defaults to their decoding)."""
        ids = [self._checked_id(i) for i in ids]
        if not ids:
            raise ValueError(
                "The prompt is empty: this model adds no start token, so there is nothing "
                "to predict from. Type at least one character."
            )
        self._check_length(len(ids))
        self._reserve(n_tokens=len(ids), n_logits=1)  # the new state replaces the old one
        try:
            logits, cache = self._forward(ids, past=None, use_cache=True)  # state kept on error
        except BaseException:
            self._settle_reservation()  # back to what the old state holds
            raise
        self.prompt = prompt if prompt is not None else str(self._tokenizer.decode(ids))
        self.prompt_ids, self.steps = ids, []
        self._cache = cache if _croppable(cache) else None
        self._logits = {len(ids): logits}
        self._settle_reservation()

    # -- distributions -----------------------------------------------------------------------
    @_locked
    def distribution(self, sampling: Sampling) -> np.ndarray:
        """Next-token probabilities (V,) float64 after the current context, shaped by
        ``sampling``; from the kept logits, no forward pass."""
        return shaped_probabilities(self._last_logits(), sampling)

    @_locked
    def next_token_probs(
        self, *, sampling: Sampling, threshold: float, n_samples: int = 5
    ) -> dict[str, Any]:
        """The wheel to show now: ``wheel_segments`` plus the applied sampling parameters,
        the threshold and the context length."""
        probs = self.distribution(sampling)
        wheel = wheel_segments(probs, threshold, self._tokenizer, n_samples=n_samples)
        return {
            **wheel,
            "sampling": sampling.applied(self._vocab_size),
            "threshold": float(threshold),
            "context_tokens": len(self.context_ids()),
        }

    @_locked
    def full_recompute_distribution(self, sampling: Sampling) -> np.ndarray:
        """The same distribution computed the slow way: the whole context, no cache."""
        context = self.context_ids()
        if not context:
            raise ValueError("Set a prompt first: the session has no context yet.")
        logits, _ = self._forward(context, past=None, use_cache=False)
        return shaped_probabilities(logits, sampling)

    def _last_logits(self) -> np.ndarray:
        if not self.prompt_ids:
            raise ValueError("Set a prompt first: the session has no context yet.")
        return self._logits[len(self.prompt_ids) + len(self.steps)]

    # -- steps -------------------------------------------------------------------------------
    @_locked
    def append(
        self, token_id: int, *, sampling: Sampling, threshold: float, choice: Choice = "token"
    ) -> Step:
        """Append one token id chosen from the wheel shaped by ``sampling`` at ``threshold``.
        Any id in the vocabulary may be appended; one outside the shaped distribution is
        recorded with probability 0."""
        check_threshold(threshold)
        if choice not in ("token", "other"):
            raise ValueError(f"choice must be 'token' or 'other'; got {choice!r}.")
        token_id = self._checked_id(token_id)
        self._check_length(len(self.context_ids()) + 1)
        probs = self.distribution(sampling)
        return self._push(token_id, probs, sampling, threshold, choice, seed=None)

    @_locked
    def append_other(self, *, sampling: Sampling, threshold: float, seed: int | None) -> Step:
        """Append a token drawn from the renormalised below-threshold part of the wheel;
        the same seed on the same wheel draws the same token."""
        check_threshold(threshold)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidSamplingError(f"seed must be an integer >= 0; got {seed!r}.", "seed")
        self._check_length(len(self.context_ids()) + 1)
        probs = self.distribution(sampling)
        token_id = sample_other(probs, threshold, np.random.default_rng(seed))
        return self._push(token_id, probs, sampling, threshold, "other", seed=seed)

    def _push(
        self,
        token_id: int,
        probs: np.ndarray,
        sampling: Sampling,
        threshold: float,
        choice: Choice,
        *,
        seed: int | None,
    ) -> Step:
        """Record the step (with the wheel ``probs`` gave) and run the model on the token."""
        step = Step(
            token_id=token_id,
            text=token_text(self._tokenizer, token_id),
            probability=float(probs[token_id]),
            choice=choice,
            sampling=sampling.applied(self._vocab_size),
            threshold=float(threshold),
            wheel=wheel_segments(probs, threshold, self._tokenizer),
            seed=seed,
        )
        context = [*self.context_ids(), token_id]
        self._reserve(n_tokens=len(context), n_logits=len(self._logits) + 1)
        try:
            logits = self._advance(context, 1)
            self.steps.append(step)
            self._remember(len(context), logits)
        finally:
            self._settle_reservation()
        return step

    @_locked
    def undo(self) -> Step | None:
        """Remove the last step (None when the context is back at the prompt)."""
        if not self.steps:
            return None
        step = self.steps.pop()
        context = self.context_ids()
        self._logits.pop(len(context) + 1, None)
        try:
            if len(context) in self._logits:
                self._crop(len(context))
            else:  # older than the logit history: run the last token again
                self._crop(len(context) - 1)
                self._remember(len(context), self._advance(context, 1))
        finally:
            self._settle_reservation()
        return step

    # -- the memory budget -------------------------------------------------------------------
    def _reserve(self, *, n_tokens: int, n_logits: int) -> None:
        """Before a pass: reserve what the session will hold after it (``n_tokens`` in the
        cache, ``n_logits`` kept vectors), if that is more than it holds now; the manager
        raises MemoryBudgetError, the state unchanged, when it does not fit."""
        estimate = n_tokens * self._token_bytes + n_logits * self._vocab_size * 4
        if estimate > self._manager.reserved_by(self.holder):
            self._manager.reserve(self.holder, estimate, kind=HOLDER_KIND)

    def _settle_reservation(self) -> None:
        """After a pass: reserve exactly what the session holds (measured), and learn the
        real bytes per token for the next estimate."""
        held = self.memory_bytes()
        if self._cache is not None:
            length = int(self._cache.get_seq_length())
            if length > 0 and held["kv_cache"]:
                self._token_bytes = math.ceil(held["kv_cache"] / length)
        self._manager.reserve(
            self.holder, held["kv_cache"] + held["logits"], kind=HOLDER_KIND, must_fit=False
        )

    # -- the cache ---------------------------------------------------------------------------
    def _advance(self, context: list[int], n_new: int) -> np.ndarray:
        """Last-position logits of ``context``, whose first ``len - n_new`` tokens the cache
        holds; the cache then holds all of it. Without a cache, the whole context runs."""
        past = self._cache
        ids = context[-n_new:] if past is not None else context
        try:
            logits, cache = self._forward(ids, past=past, use_cache=True)
        except BaseException:
            self._cache = None  # maybe half-updated: the next step recomputes it whole
            raise
        self._cache = cache if _croppable(cache) else None
        return logits

    def _crop(self, length: int) -> None:
        if self._cache is None:
            return
        extra = self._cache.get_seq_length() - length
        if extra > 0:
            self._cache.crop(-extra)  # negative: remove that many (any transformers >= 4.46)

    def _remember(self, length: int, logits: np.ndarray) -> None:
        self._logits[length] = logits
        stale_below = length - self._history  # keep this one and `history` before it
        prompt_length = len(self.prompt_ids)
        for key in [k for k in self._logits if k < stale_below and k != prompt_length]:
            del self._logits[key]

    def _forward(self, ids: list[int], *, past: Any, use_cache: bool) -> tuple[np.ndarray, Any]:
        """One forward pass over ``ids`` after ``past``: (last logits (V,) float32, cache)."""
        with self._manager.use(self.model_name, exclusive=True) as handle, torch.no_grad():
            model = handle.model
            if model.training:
                model.eval()
            input_ids = torch.tensor([ids], dtype=torch.long, device=handle.device)
            out = model(
                input_ids=input_ids, past_key_values=past, use_cache=use_cache, **_last_only(model)
            )
            logits = out.logits[0, -1].float().cpu().numpy()
        return logits, (out.past_key_values if use_cache else None)

    # -- checks ------------------------------------------------------------------------------
    def _checked_id(self, token_id: int) -> int:
        ok = isinstance(token_id, int | np.integer) and not isinstance(token_id, bool)
        if not ok or not 0 <= int(token_id) < self._vocab_size:
            raise ValueError(
                f"token_id must be an integer from 0 to {self._vocab_size - 1} "
                f"(the vocabulary of {self.model_name}); got {token_id!r}."
            )
        return int(token_id)

    def _check_length(self, n_tokens: int) -> None:
        if n_tokens > self._limit:
            raise ContextTooLongError(n_tokens, self._limit, self._limit_source)

    # -- views -------------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """What this session holds: key/value cache and kept logit vectors, in bytes
        (zeros once closed)."""
        with self.lock:
            return {
                "kv_cache": cache_bytes(self._cache),
                "logits": sum(v.nbytes for v in self._logits.values()),
            }

    @_locked
    def appended_text(self) -> str:
        """The appended tokens' text, decoded from their ids after the prompt's."""
        appended = [step.token_id for step in self.steps]
        if not appended:
            return ""
        head = self._tokenizer.decode(self.prompt_ids)
        whole = self._tokenizer.decode(self.prompt_ids + appended)
        if whole.startswith(head):  # keeps the space a sentencepiece "▁x" decodes to
            return str(whole[len(head) :])
        return str(self._tokenizer.decode(appended))

    @_locked
    def snapshot(self) -> dict[str, Any]:
        """The session as JSON-safe data (times as ISO-8601 UTC)."""
        return {
            "id": self.id,
            "model_name": self.model_name,
            "prompt": self.prompt,
            "prompt_tokens": [
                {"id": i, "text": token_text(self._tokenizer, i)} for i in self.prompt_ids
            ],
            "steps": [step.as_dict() for step in self.steps],
            "text": self.prompt + self.appended_text(),
            "context_tokens": len(self.context_ids()),
            "created_at": _iso(self.created_at),
            "last_used": _iso(self.last_used),
            "expires_at": _iso(self.expires_at),
        }


class _Nobody:
    """Stands in for a missing session so a key is compared all the same."""

    _key_digest = key_digest(secrets.token_urlsafe(32))

    def allows(self, key: str | None, account: str | None) -> bool:
        hmac.compare_digest(key_digest(key or ""), self._key_digest)
        return False


_NOBODY = _Nobody()


def _context_limit(handle: ModelHandle, setting: int) -> tuple[int, str]:
    model_limit = model_context_limit(handle)
    if model_limit is not None and model_limit < setting:
        return model_limit, f"the longest context {handle.name} accepts"
    return setting, CONTEXT_LIMIT_SETTING


def _last_only(model: torch.nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only (saves a (T, V) tensor) when supported."""
    accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}


# -- the store -------------------------------------------------------------------------------


class SessionStore:
    """The live token-wheel sessions of one process."""

    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        *,
        clock: Clock = time.time,
        logit_history: int = LOGIT_HISTORY,
    ) -> None:
        self.settings = settings
        self._manager = manager
        self._clock = clock
        self._logit_history = logit_history
        self._sessions: dict[str, WheelSession] = {}
        self._lock = threading.Lock()

    @property
    def ttl_seconds(self) -> int:
        return self.settings.wheel_session_ttl_seconds

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(
        self, model_name: str, *, client: str | None = None, owner: str | None = None
    ) -> WheelSession:
        """A new session on ``model_name`` (loaded if needed, and pinned while the session
        lives); no prompt yet. ``client`` is who it counts against for the per-client
        limit (None: no such limit), ``owner`` the signed-in account that may open it
        without its key. TooManySessionsError when either limit is reached."""
        self._check_limits(client)  # before loading anything
        session_id = str(uuid.uuid4())
        holder = f"wheel:{session_id}"
        handle = self._manager.pin(model_name, holder, kind=HOLDER_KIND)
        try:
            check_causal(handle)
            with self._lock:
                self._check_limits_locked(client)  # again: others may have come meanwhile
                session = WheelSession(
                    self._manager,
                    handle,
                    max_context_tokens=self.settings.wheel_max_context_tokens,
                    ttl_seconds=self.ttl_seconds,
                    clock=self._clock,
                    logit_history=self._logit_history,
                    session_id=session_id,
                    client=client,
                    owner=owner,
                )
                self._sessions[session.id] = session
        except BaseException:
            self._manager.release(holder)
            raise
        return session

    def get(self, session_id: str) -> WheelSession:
        """The live session ``session_id``, now marked as used (for callers in this process
        that own every session, such as the Python API; the web uses ``get_owned``)."""
        return self._lookup(session_id, key=None, account=None, check=False)

    def get_owned(self, session_id: str, *, key: str | None, account: str | None) -> WheelSession:
        """The live session ``session_id`` if ``key`` is its key or ``account`` created it;
        otherwise SessionNotFoundError, the same as for an id that never existed."""
        return self._lookup(session_id, key=key, account=account, check=True)

    def delete(self, session_id: str) -> bool:
        """Close and forget the session; False if there was none."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._close([session])
        return True

    def cleanup(self) -> int:
        """Remove expired sessions; how many were removed."""
        with self._lock:
            expired = self._pop_expired()
        self._close(expired)
        return len(expired)

    def _lookup(
        self, session_id: str, *, key: str | None, account: str | None, check: bool
    ) -> WheelSession:
        now = self._clock()
        expired: WheelSession | None = None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and self._expired(session, now):
                expired, session = self._sessions.pop(session_id), None
            if check:  # compare a key even when there is no session: same time either way
                allowed = (session or _NOBODY).allows(key, account) and session is not None
            else:
                allowed = session is not None
            if allowed and session is not None:
                session.touch(now)
        if expired is not None:
            self._close([expired])
        if not allowed or session is None:
            raise SessionNotFoundError(session_id, self.ttl_seconds)
        return session

    # -- limits ----------------------------------------------------------------------------
    def _check_limits(self, client: str | None) -> None:
        """Drop expired sessions, then check the limits (before loading any model)."""
        with self._lock:
            expired = self._pop_expired()
        self._close(expired)
        with self._lock:
            self._check_limits_locked(client)

    def _check_limits_locked(self, client: str | None) -> None:
        """TooManySessionsError if the client, or everyone, holds the most sessions
        allowed (expired ones do not count). Lock held."""
        now = self._clock()
        live = [s for s in self._sessions.values() if not self._expired(s, now)]
        per_client = self.settings.wheel_sessions_per_client
        if client is not None:
            mine = [s for s in live if s.client == client]
            if len(mine) >= per_client:
                wait = min(s.expires_at for s in mine) - now
                raise TooManyClientSessionsError(per_client, self.ttl_seconds, wait)
        limit = self.settings.wheel_max_sessions
        if len(live) >= limit:
            wait = min(s.expires_at for s in live) - now
            raise TooManySessionsError(limit, self.ttl_seconds, wait)

    # -- expiry ----------------------------------------------------------------------------
    def _expired(self, session: WheelSession, now: float) -> bool:
        return now - session.last_used > self.ttl_seconds

    def _pop_expired(self) -> list[WheelSession]:
        """Take the expired sessions out of the store. Lock held; close them after."""
        now = self._clock()
        expired = [s for s in self._sessions.values() if self._expired(s, now)]
        for session in expired:
            del self._sessions[session.id]
        return expired

    def _close(self, sessions: list[WheelSession]) -> None:
        """Close sessions taken out of the store (outside the store's lock: closing waits
        for a request running on the session), then return the freed memory."""
        if not sessions:
            return
        for session in sessions:
            session.close()
        return_freed_memory()

    async def run_cleanup_loop(self) -> None:
        """Every ``wheel_cleanup_interval_seconds``, remove expired sessions (run as a task
        in the app's lifespan; cancel it at shutdown)."""
        while True:
            await asyncio.sleep(self.settings.wheel_cleanup_interval_seconds)
            try:  # in a thread: closing waits for a request still running on a session
                removed = await asyncio.to_thread(self.cleanup)
            except Exception:  # keep sweeping whatever went wrong once
                logger.exception("Token-wheel session cleanup failed")
                continue
            if removed:
                logger.info("Removed {} expired token-wheel sessions", removed)
