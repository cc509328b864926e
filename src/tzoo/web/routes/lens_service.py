"""The lens service over REST and a WebSocket, on the reference system's paths:
``POST /analyze``, ``GET /status/{id}``, ``/ws``, ``/api/v2/models``,
``/api/v2/models/switch``, ``/api/gpu_stats`` and ``/metrics``.

Thin: ``tzoo.service.lens_jobs`` queues and runs, ``tzoo.service.model_groups`` knows the
groups. When TZOO_API_KEY is set every route here asks for it (``Authorization: Bearer``;
the WebSocket also takes ``?api_key=``, since browsers cannot set its headers).

Who may do what:
- Switching the default group (REST and the WebSocket's ``switch_model``) is the
  operator's: the TZOO_API_KEY holder or an admin account (its session cookie or API
  token); anyone else gets 403 with a sentence. Switching loads the model in the load
  pool (``tzoo.service.model_loading``): at most TZOO_HUB_LOAD_TIMEOUT seconds, then 504.
- A request belongs to whoever sent it (``Job.owner``): the account (``user:<id>``), the
  operator, the WebSocket connection (``ws:<id>``) of an anonymous socket, or the address
  (``ip:<host>``) of an anonymous REST caller. ``GET /status`` and ``POST /cancel`` of
  someone else's request answer the same 404 as an unknown id; the operator may act on
  any. Over the WebSocket, status, cancel and interrupt reach only the connection's own.
- A WebSocket message over TZOO_WS_MAX_MESSAGE_BYTES (413) or nested deeper than
  TZOO_JSON_MAX_DEPTH (400) gets an error reply before it is parsed; the connection stays.
- Server paths (a group's model loaded from a local directory, the host in
  ``/api/gpu_stats``) are shown to the operator only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from contextlib import suppress
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from tzoo.service.lens_jobs import ANALYSES, Analysis, Job, JobOptions, JobQueue, message
from tzoo.service.metrics import CONTENT_TYPE
from tzoo.service.model_groups import ModelGroup, ModelGroups
from tzoo.service.model_loading import ModelLoader
from tzoo.service.rate_limit import RateLimitedError, RateLimiter
from tzoo.service.system_stats import system_stats
from tzoo.web.deps import (
    ADMIN_REQUIRED,
    AdminDep,
    Auth,
    AuthDep,
    SessionDep,
    authenticate,
    client_key,
)
from tzoo.web.errors import error_body, retry_after_of, status_for

API_KEY_MISSING = "This server needs an API key: send 'Authorization: Bearer KEY'."
API_KEY_WRONG = "The API key is wrong."
# Close codes of our own (4000-4999): the browser sees them, unlike a refused handshake.
CLOSE_UNAUTHORISED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
MESSAGE_TYPES = (
    "analyze",
    "status",
    "list_model_groups",
    "switch_model",
    "cancel_request",
    "interrupt",
)


def _key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = _bearer(request.headers.get("authorization"))
    if not _key_matches(given, expected):
        raise HTTPException(
            401,
            API_KEY_MISSING if given is None else API_KEY_WRONG,
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(tags=["lens service"], dependencies=[Depends(require_api_key)])
sockets = APIRouter()


def get_queue(request: Request) -> JobQueue:
    return request.app.state.lens_queue


def get_groups(request: Request) -> ModelGroups:
    return request.app.state.model_groups


def get_loader(request: Request) -> ModelLoader:
    return request.app.state.model_loader


QueueDep = Annotated[JobQueue, Depends(get_queue)]
GroupsDep = Annotated[ModelGroups, Depends(get_groups)]
LoaderDep = Annotated[ModelLoader, Depends(get_loader)]


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(examples=["The capital of France is Paris."])
    analysis: Analysis = Field(examples=["logit_lens"])
    model_group: str | None = Field(None, max_length=200, examples=["smollm2-135m"])
    options: JobOptions = Field(default_factory=JobOptions)
    client_request_id: str | None = Field(None, max_length=200)


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_group: str = Field(min_length=1, max_length=200, examples=["smollm2-135m"])


def describe_error(exc: BaseException) -> dict[str, Any]:
    """``{error, message, status}`` for a failed request: user errors say what was wrong;
    anything else is logged and reported without details."""
    if isinstance(exc, _BadMessage):
        return {"error": exc.error, "message": str(exc), "status": exc.status}
    status = status_for(exc) if isinstance(exc, Exception) else 500
    if status == 500 and isinstance(exc, ValueError):
        status = 422  # the analyses raise ValueError, with a sentence, for bad options
    if status == 500:
        logger.opt(exception=exc).error("A lens request failed")
        return {
            "error": "InternalError",
            "message": "Internal error; the server log has the details.",
            "status": 500,
        }
    body = error_body(exc) if isinstance(exc, Exception) else {"detail": str(exc)}
    extra = {k: v for k, v in body.items() if k not in ("detail", "error")}
    wait = retry_after_of(exc) if isinstance(exc, Exception) else None
    if wait is not None:  # a full queue or load pool: when to try again
        extra.setdefault("retry_after", wait)
    return {"error": type(exc).__name__, "message": body["detail"], "status": status, **extra}


def _client_key(host: str | None) -> str:
    return host or "unknown"


# -- REST ------------------------------------------------------------------------------------


@router.post(
    "/analyze",
    status_code=202,
    responses={
        413: {"description": "Text over TZOO_MAX_TEXT_LENGTH"},
        422: {"description": "Empty text, unknown analysis or bad options"},
        404: {"description": "Unknown model group"},
        429: {"description": "Rate limit; see Retry-After"},
        503: {"description": "Queue full"},
    },
)
def analyze(
    body: AnalyzeRequest, request: Request, queue: QueueDep, auth: AuthDep
) -> dict[str, Any]:
    """Queue a logit lens, tuned lens or verbalisation; poll ``GET /status/{request_id}``.
    The request is the sender's: only they (and the operator) can read or cancel it."""
    request.app.state.rate_limiter.check(_client_key(request.client and request.client.host))
    job = queue.submit(
        body.text,
        body.analysis,
        group=body.model_group,
        options=body.options,
        owner=client_key(request, auth),
        client_request_id=body.client_request_id,
    )
    return {"request_id": job.id, "status": str(job.status), **_place(queue, job)}


def _place(queue: JobQueue, job: Job) -> dict[str, Any]:
    return {"position": queue.position(job), "queue_size": queue.overview()["queue_size"]}


def _own_job(queue: JobQueue, request_id: str, request: Request, auth: Auth) -> Job:
    """The caller's request ``request_id`` (any request, for the operator); someone else's
    is a RequestNotFoundError, word for word that of an unknown id."""
    return queue.get(request_id, owner=None if auth.is_admin else client_key(request, auth))


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown or expired id, or someone else's request"}
}


@router.get("/status/{request_id}", responses=_NOT_FOUND)
def status(request_id: str, request: Request, queue: QueueDep, auth: AuthDep) -> Response:
    """A request's status, position (1-based; 0 = running), progress, and its result once
    it has one (a stopped verbalisation has a partial result, ``complete`` false). Only
    the request's sender (and the operator) may read it."""
    job = _own_job(queue, request_id, request, auth)
    return Response(
        message(queue.status_fields(job), job.result_json), media_type="application/json"
    )


@router.post("/cancel/{request_id}", responses=_NOT_FOUND)
def cancel(
    request_id: str, request: Request, queue: QueueDep, auth: AuthDep, keep_partial: bool = False
) -> dict[str, Any]:
    """Cancel a request: a queued one is dropped, a running one stops between batches.
    ``keep_partial`` interrupts instead: the request completes with what it has. Only the
    request's sender (and the operator) may cancel it."""
    job = _own_job(queue, request_id, request, auth)
    job = queue.interrupt(job.id) if keep_partial else queue.cancel(job.id)
    return queue.status_fields(job)


@router.get("/api/v2/models")
def list_groups(groups: GroupsDep, auth: AuthDep) -> dict[str, Any]:
    """The model groups (a base model plus its lenses), which is current, which loaded."""
    return {"groups": groups.describe(operator=auth.is_admin), "current_group": groups.current}


async def switch_in_pool(loader: ModelLoader, groups: ModelGroups, name: str) -> ModelGroup:
    """``groups.switch(name)`` in the model-load pool, awaited for at most
    TZOO_HUB_LOAD_TIMEOUT seconds (LoadTimeoutError, 504; the switch goes on)."""
    future = loader.submit(f"switch:{name}", groups.switch, name)
    return await loader.wait(future, f"Switching to model group {name!r}")


@router.post(
    "/api/v2/models/switch",
    responses={
        403: {"description": "Not the operator (or a missing CSRF token)"},
        404: {"description": "Unknown model group"},
        503: {"description": "The load pool's waiting line is full; see Retry-After"},
        504: {"description": "The model took longer than TZOO_HUB_LOAD_TIMEOUT to load"},
    },
)
async def switch_group(
    body: SwitchRequest,
    _operator: AdminDep,
    session: SessionDep,
    groups: GroupsDep,
    loader: LoaderDep,
) -> dict[str, Any]:
    """Make a group the default, loading its model; the previous one is kept in a CPU
    cache. Answers when the model is loaded. The operator only."""
    await run_in_threadpool(session.close)  # no database connection held while loading
    started = time.monotonic()
    group = await switch_in_pool(loader, groups, body.model_group)
    return {
        "model_group": group.name,
        "elapsed_s": round(time.monotonic() - started, 3),
        "groups": groups.describe(operator=True),
    }


@router.get("/api/gpu_stats")
def gpu_stats(request: Request, auth: AuthDep) -> dict[str, Any]:
    """GPU memory and utilisation where there are GPUs; CPU, RAM and models always; and
    the queue. The operator also sees this process and the host (pid, hostname, data and
    cache folders) and the paths of models loaded from local directories."""
    return {
        **system_stats(request.app.state.manager, operator=auth.is_admin),
        "queue": request.app.state.lens_queue.overview(),
    }


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics of the lens service and the models."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


# -- WebSocket -------------------------------------------------------------------------------


def _origin_allowed(websocket: WebSocket) -> bool:
    """Browsers send Origin; a page of another site may only connect when listed in
    TZOO_ALLOWED_ORIGINS. Clients that send none (scripts) are not browsers."""
    origin = websocket.headers.get("origin")
    if not origin:
        return True
    settings = websocket.app.state.settings
    if origin in settings.allowed_origins or "*" in settings.allowed_origins:
        return True
    return urlsplit(origin).netloc == websocket.headers.get("host")


@sockets.websocket("/ws")
async def lens_socket(websocket: WebSocket) -> None:
    state = websocket.app.state
    if not _origin_allowed(websocket):
        await websocket.close(code=CLOSE_FORBIDDEN_ORIGIN, reason="Origin not allowed")
        return
    await websocket.accept()
    expected = state.settings.api_key
    if expected:
        given = _bearer(websocket.headers.get("authorization")) or websocket.query_params.get(
            "api_key"
        )
        if not _key_matches(given, expected):
            text = API_KEY_MISSING if given is None else API_KEY_WRONG
            await websocket.send_text(
                json.dumps(
                    {
                        "type": "error",
                        "request_id": None,
                        "error": "Unauthorized",
                        "message": text + " (WebSocket: ?api_key=KEY)",
                        "status": 401,
                    }
                )
            )
            await websocket.close(code=CLOSE_UNAUTHORISED, reason="API key")
            return
    connection = _Connection(websocket, key_holder=bool(expected))
    await connection.identify()
    await connection.serve()


def _socket_auth(websocket: WebSocket) -> tuple[bool, str | None]:
    """(operator?, client key) of a WebSocket's login cookie or Authorization header, read
    now (not the value cached on the connection, so a revoked role stops at once)."""
    websocket.scope.setdefault("state", {}).pop("auth", None)
    with websocket.app.state.session_factory() as session:
        try:
            # authenticate reads headers, cookies, app and state: a WebSocket has them all.
            auth = authenticate(cast(Request, websocket), session)
        except HTTPException:  # a Bearer token that is not valid: anonymous here
            return False, None
        return auth.is_admin, auth.client_key


class _Connection:
    """One WebSocket client: its id, its outbox (events come from the queue's listener
    on the event loop) and its requests, all cancelled when it goes away."""

    def __init__(self, websocket: WebSocket, *, key_holder: bool = False) -> None:
        self.websocket = websocket
        self.state = websocket.app.state
        self.queue: JobQueue = self.state.lens_queue
        self.groups: ModelGroups = self.state.model_groups
        self.loader: ModelLoader = self.state.model_loader
        self.client_id = uuid.uuid4().hex
        self.client_key = _client_key(websocket.client and websocket.client.host)
        # Opened with TZOO_API_KEY: the operator for the connection's whole life.
        self.key_holder = key_holder
        self.operator = key_holder
        self.owner = "operator" if key_holder else f"ws:{self.client_id}"
        self.outbox: asyncio.Queue[str] = asyncio.Queue()

    async def identify(self) -> None:
        """Who opened the socket (a login cookie, an API token), for ``owner`` and what
        ``connection_established`` shows."""
        if self.key_holder:
            return
        self.operator, key = await run_in_threadpool(_socket_auth, self.websocket)
        self.owner = key or f"ws:{self.client_id}"

    async def _is_operator(self) -> bool:
        if self.key_holder:
            return True
        operator, _ = await run_in_threadpool(_socket_auth, self.websocket)
        return operator

    def send(self, fields: dict[str, Any], result_json: str | None = None) -> None:
        self.outbox.put_nowait(message(fields, result_json))

    def error(self, exc: BaseException, request_id: str | None = None, **extra: Any) -> None:
        self.send({"type": "error", "request_id": request_id, **describe_error(exc), **extra})

    async def serve(self) -> None:
        metrics = self.state.metrics
        metrics.websockets.inc()
        sender = asyncio.create_task(self._send_loop())
        self.send(
            {
                "type": "connection_established",
                "client_id": self.client_id,
                **self.queue.overview(),
                "model_groups": self.groups.describe(operator=self.operator),
                "current_group": self.groups.current,
                "analyses": list(ANALYSES),
                "max_text_length": self.state.settings.max_text_length,
                "api_key_required": bool(self.state.settings.api_key),
            }
        )
        try:
            while True:
                incoming = await self.websocket.receive()
                if incoming["type"] == "websocket.disconnect":
                    break
                await self._handle(incoming.get("text"))
        except WebSocketDisconnect:
            pass
        finally:
            cancelled = self.queue.cancel_client(self.client_id)
            if cancelled:
                logger.info("WebSocket closed: cancelled its {} requests", cancelled)
            sender.cancel()
            with suppress(asyncio.CancelledError):
                await sender
            metrics.websockets.dec()

    async def _send_loop(self) -> None:
        while True:
            text = await self.outbox.get()
            try:
                await self.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError):
                return  # closed; the receive side cleans up

    async def _handle(self, raw: str | None) -> None:
        settings = self.state.settings
        if raw is not None and _too_large(raw, settings.ws_max_message_bytes):
            self.error(_MessageTooLarge(settings.ws_max_message_bytes))
            return
        # Depth before json.loads: its recursion on [[[[...]]]] would end the connection.
        if raw is not None and json_depth_over(raw, settings.json_max_depth):
            self.error(_TooDeep(settings.json_max_depth))
            return
        try:
            data = json.loads(raw) if raw is not None else None
        except (json.JSONDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            self.error(_BadMessage('Messages are JSON objects with a "type" field.'))
            return
        kind = data["type"]
        handler = getattr(self, f"_on_{kind}", None) if kind in MESSAGE_TYPES else None
        if handler is None:
            self.error(
                _BadMessage(
                    f"Unknown message type {kind!r}; the types are {', '.join(MESSAGE_TYPES)}."
                )
            )
            return
        request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
        # A refused analyze has no request id yet: echo the client's own tag instead.
        tag = data.get("client_request_id")
        extra = {"client_request_id": tag} if isinstance(tag, str) else {}
        try:
            await handler(data)
        except ValidationError as exc:
            self.error(_BadMessage(_validation_sentence(exc)), request_id, **extra)
        except RateLimitedError as exc:
            self.error(exc, request_id, retry_after=exc.retry_after, **extra)
        except Exception as exc:
            self.error(exc, request_id, **extra)

    async def _on_analyze(self, data: dict[str, Any]) -> None:
        body = AnalyzeRequest.model_validate({k: v for k, v in data.items() if k != "type"})
        self.state.rate_limiter.check(self.client_key)
        self.queue.submit(
            body.text,
            body.analysis,
            group=body.model_group,
            options=body.options,
            client_id=self.client_id,
            owner=self.owner,
            listener=self.outbox.put_nowait,
            client_request_id=body.client_request_id,
        )

    async def _on_status(self, data: dict[str, Any]) -> None:
        request_id = data.get("request_id")
        if request_id is None:
            own = [self.queue.status_fields(j) for j in self.queue.requests_of(self.client_id)]
            self.send({"type": "status", **self.queue.overview(), "requests": own})
            return
        job = self.queue.get(str(request_id), self.client_id)
        self.send({"type": "status", **self.queue.status_fields(job)}, job.result_json)

    async def _on_list_model_groups(self, data: dict[str, Any]) -> None:
        self.send(
            {
                "type": "model_groups",
                "groups": self.groups.describe(operator=self.operator),
                "current_group": self.groups.current,
            }
        )

    async def _on_switch_model(self, data: dict[str, Any]) -> None:
        if not await self._is_operator():
            raise _OperatorOnly(ADMIN_REQUIRED)
        body = SwitchRequest.model_validate({"model_group": data.get("model_group")})
        started = time.monotonic()
        self.send(
            {
                "type": "progress",
                "request_id": None,
                "stage": "loading",
                "done": 0,
                "total": 1,
                "model_group": body.model_group,
            }
        )
        group = await switch_in_pool(self.loader, self.groups, body.model_group)
        self.send(
            {
                "type": "model_switch_complete",
                "model_group": group.name,
                "elapsed_s": round(time.monotonic() - started, 3),
                "groups": self.groups.describe(operator=True),
            }
        )

    async def _on_cancel_request(self, data: dict[str, Any]) -> None:
        self.queue.cancel(_request_id(data), self.client_id)

    async def _on_interrupt(self, data: dict[str, Any]) -> None:
        self.queue.interrupt(_request_id(data), self.client_id)


class _BadMessage(ValueError):
    """A WebSocket message that is not one the protocol knows (answered with status 400)."""

    error = "BadMessage"
    status = 400


class _MessageTooLarge(_BadMessage):
    error = "MessageTooLarge"
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This message is over {limit} bytes, the most this socket reads "
            "(TZOO_WS_MAX_MESSAGE_BYTES); send less text at a time."
        )


class _TooDeep(_BadMessage):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This message's JSON is nested more than {limit} levels deep "
            "(TZOO_JSON_MAX_DEPTH); no message of this protocol needs that."
        )


class _OperatorOnly(_BadMessage):
    error = "Forbidden"
    status = 403


def _too_large(text: str, limit: int) -> bool:
    """Whether ``text`` is over ``limit`` bytes in UTF-8 (encoded only when it could be)."""
    if len(text) > limit:
        return True
    return len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit


# A JSON string (escapes included; an unclosed one runs to the end), or one bracket: what
# the depth scan looks at. Possessive and anchored, so every match is found in one pass.
_STRING_OR_BRACKET = re.compile(r'(?s)"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[\[\]{}]')


def json_depth_over(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``limit`` deep: one
    linear scan of the brackets outside strings, no recursion. Malformed text is left to
    the parser to refuse."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


def _request_id(data: dict[str, Any]) -> str:
    value = data.get("request_id")
    if not isinstance(value, str) or not value:
        raise _BadMessage('This message needs a "request_id".')
    return value


def _validation_sentence(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors()
    )


def rate_limit_response(_request: Request, exc: Exception) -> JSONResponse:
    """429 with Retry-After (installed by the app)."""
    assert isinstance(exc, RateLimitedError)
    return JSONResponse(
        {"detail": str(exc), "error": "RateLimitedError", "retry_after": exc.retry_after},
        status_code=429,
        headers={"Retry-After": str(exc.retry_after)},
    )


__all__ = ["RateLimiter", "rate_limit_response", "router", "sockets"]
