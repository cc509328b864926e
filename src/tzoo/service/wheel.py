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
"""

from __future__ import annotations

import asyncio
import functools
import inspect
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
from tzoo.runtime.manager import ModelManager

CONTEXT_LIMIT_SETTING = "TZOO_WHEEL_MAX_CONTEXT_TOKENS"
SESSIONS_LIMIT_SETTING = "TZOO_WHEEL_MAX_SESSIONS"
LOGIT_HISTORY = 16  # earlier last-position logit vectors kept (besides the prompt's)
Choice = Literal["token", "other"]
Clock = Callable[[], float]

P = ParamSpec("P")
R = TypeVar("R")


# -- errors ----------------------------------------------------------------------------------


class SessionNotFoundError(LookupError):
    """No live session has this id (never created, deleted, or expired). HTTP 404."""

    def __init__(self, session_id: str, ttl_seconds: int) -> None:
        super().__init__(
            f"No session {session_id}; it may have expired after {_duration(ttl_seconds)} idle."
        )
        self.session_id = session_id


class TooManySessionsError(RuntimeError):
    """The most live sessions allowed already exist. HTTP 429."""

    def __init__(self, limit: int, ttl_seconds: int) -> None:
        super().__init__(
            f"There are already {limit} token-wheel sessions, the most allowed "
            f"({SESSIONS_LIMIT_SETTING}); delete one or try again when an idle one has "
            f"expired (after {_duration(ttl_seconds)})."
        )
        self.limit = limit


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
    """Run ``method`` holding the session's lock."""

    @functools.wraps(method)
    def wrapper(self: WheelSession, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
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
    ) -> None:
        self.id = str(uuid.uuid4())
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
        logits, cache = self._forward(ids, past=None, use_cache=True)  # state kept on error
        self.prompt = prompt if prompt is not None else str(self._tokenizer.decode(ids))
        self.prompt_ids, self.steps = ids, []
        self._cache = cache if _croppable(cache) else None
        self._logits = {len(ids): logits}

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
        logits = self._advance(context, 1)
        self.steps.append(step)
        self._remember(len(context), logits)
        return step

    @_locked
    def undo(self) -> Step | None:
        """Remove the last step (None when the context is back at the prompt)."""
        if not self.steps:
            return None
        step = self.steps.pop()
        context = self.context_ids()
        self._logits.pop(len(context) + 1, None)
        if len(context) in self._logits:
            self._crop(len(context))
        else:  # older than the logit history: run the last token again
            self._crop(len(context) - 1)
            self._remember(len(context), self._advance(context, 1))
        return step

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
    @_locked
    def memory_bytes(self) -> dict[str, int]:
        """What this session holds: key/value cache and kept logit vectors, in bytes."""
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

    def create(self, model_name: str) -> WheelSession:
        """A new session on ``model_name`` (loaded if needed); no prompt yet."""
        handle = self._manager.get(model_name)
        check_causal(handle)
        with self._lock:
            self._drop_expired()
            limit = self.settings.wheel_max_sessions
            if len(self._sessions) >= limit:
                raise TooManySessionsError(limit, self.ttl_seconds)
            session = WheelSession(
                self._manager,
                handle,
                max_context_tokens=self.settings.wheel_max_context_tokens,
                ttl_seconds=self.ttl_seconds,
                clock=self._clock,
                logit_history=self._logit_history,
            )
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> WheelSession:
        """The live session ``session_id``, now marked as used."""
        now = self._clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or self._expired(session, now):
                self._sessions.pop(session_id, None)
                raise SessionNotFoundError(session_id, self.ttl_seconds)
            session.touch(now)
            return session

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def cleanup(self) -> int:
        """Remove expired sessions; how many were removed."""
        with self._lock:
            return self._drop_expired()

    def _expired(self, session: WheelSession, now: float) -> bool:
        return now - session.last_used > self.ttl_seconds

    def _drop_expired(self) -> int:
        now = self._clock()
        expired = [sid for sid, s in self._sessions.items() if self._expired(s, now)]
        for session_id in expired:
            del self._sessions[session_id]
        return len(expired)

    async def run_cleanup_loop(self) -> None:
        """Every ``wheel_cleanup_interval_seconds``, remove expired sessions (run as a task
        in the app's lifespan; cancel it at shutdown)."""
        while True:
            await asyncio.sleep(self.settings.wheel_cleanup_interval_seconds)
            try:
                removed = self.cleanup()
            except Exception:  # keep sweeping whatever went wrong once
                logger.exception("Token-wheel session cleanup failed")
                continue
            if removed:
                logger.info("Removed {} expired token-wheel sessions", removed)
