"""One place that turns errors into HTTP answers with a sentence, never a trace."""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Mount

from tzoo.analyses.attention import EmptyInputError, InputTooLongError
from tzoo.analyses.lens import LensUnsupportedError
from tzoo.analyses.tuned_lens import LensMismatchError
from tzoo.analyses.verbalize import NotADecoderError
from tzoo.runtime.errors import (
    DeviceError,
    ModelError,
    ModelLoadError,
    ModelTooLargeError,
    ModelUnavailableError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from tzoo.runtime.manager import MemoryBudgetError, ModelBusyError
from tzoo.service.circuits import (
    GraphRequestError,
    NoSuchFeatureError,
    TranscodersChangedError,
    TranscodersNotTrainedError,
    UnknownTranscodersError,
)
from tzoo.service.lens_jobs import (
    QueueFullError,
    RequestNotFoundError,
    RequestTimeoutError,
    TextTooLongError,
)
from tzoo.service.model_groups import NoGroupError, TunedLensMissingError, UnknownGroupError
from tzoo.service.model_loading import LoadTimeoutError, LocalPathRefusedError
from tzoo.service.quotas import QuotaExceededError
from tzoo.service.rate_limit import RateLimitedError
from tzoo.service.wheel import ContextTooLongError, SessionNotFoundError, TooManySessionsError

# Seconds a client is told to wait when the lens queue is full.
QUEUE_FULL_RETRY_AFTER = 5

# Most specific first: the first matching class decides the status.
STATUS_OF: list[tuple[type[Exception], int]] = [
    (UnknownModelError, 404),
    (ModelTooLargeError, 413),
    (ModelLoadError, 422),
    (DeviceError, 422),
    (UnsupportedArchitectureError, 422),
    (ModelBusyError, 409),
    (MemoryBudgetError, 507),
    (ModelUnavailableError, 503),
    (LocalPathRefusedError, 403),
    (LoadTimeoutError, 504),
    (InputTooLongError, 413),
    (EmptyInputError, 422),
    (SessionNotFoundError, 404),
    (TooManySessionsError, 429),
    (ContextTooLongError, 413),
    (QueueFullError, 503),
    (RateLimitedError, 429),
    (QuotaExceededError, 429),
    (RequestNotFoundError, 404),
    (RequestTimeoutError, 504),
    (TextTooLongError, 413),
    (UnknownGroupError, 404),
    (NoGroupError, 422),
    (TunedLensMissingError, 409),
    (LensUnsupportedError, 422),
    (LensMismatchError, 422),
    (NotADecoderError, 422),
    (UnknownTranscodersError, 404),
    (NoSuchFeatureError, 404),
    (TranscodersNotTrainedError, 409),
    (TranscodersChangedError, 409),
    (GraphRequestError, 422),
]
USER_ERRORS: tuple[type[Exception], ...] = (
    ModelError,
    InputTooLongError,
    EmptyInputError,
    SessionNotFoundError,
    TooManySessionsError,
    ContextTooLongError,
    QueueFullError,
    QuotaExceededError,
    RequestNotFoundError,
    TextTooLongError,
    UnknownGroupError,
    NoGroupError,
    TunedLensMissingError,
    LensUnsupportedError,
    LensMismatchError,
    NotADecoderError,
    UnknownTranscodersError,
    NoSuchFeatureError,
    TranscodersNotTrainedError,
    TranscodersChangedError,
    GraphRequestError,
)


def status_for(exc: Exception) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 500


def retry_after_of(exc: Exception) -> int | None:
    """Seconds a client should wait before trying again, for every 429 and a full queue:
    an error that knows (``retry_after``) says so, the others get a fixed pause."""
    wait = getattr(exc, "retry_after", None)
    if isinstance(wait, int | float) and not isinstance(wait, bool):
        return max(1, int(wait))
    if isinstance(exc, QueueFullError) or status_for(exc) == 429:
        return QUEUE_FULL_RETRY_AFTER
    return None


def error_body(exc: Exception) -> dict[str, object]:
    message = exc.message if isinstance(exc, ModelError) else str(exc)
    body: dict[str, object] = {"detail": message, "error": type(exc).__name__}
    if isinstance(exc, UnknownModelError | UnknownGroupError):
        body["known"] = exc.known
    if isinstance(exc, ModelTooLargeError):
        body.update(size_bytes=exc.size_bytes, limit_bytes=exc.limit_bytes, limit=exc.limit_name)
    return body


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation_error)

    async def _user_error(_request: Request, exc: Exception) -> JSONResponse:
        wait = retry_after_of(exc)
        headers = {"Retry-After": str(wait)} if wait is not None else None
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=headers)

    for cls in USER_ERRORS:
        app.add_exception_handler(cls, _user_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error(
            "Unhandled error on {} {}", request.method, request.url.path
        )
        return JSONResponse(
            {"detail": "Internal error; the server log has the details.", "error": "InternalError"},
            status_code=500,
        )


# --- the one error schema ------------------------------------------------------------

# How much of a rejected input an error may quote back, in characters.
EXCERPT_CHARS = 200
# Validation errors listed one by one; a body with thousands of bad items gets a count.
MAX_LISTED_ERRORS = 20


class ErrorItem(BaseModel):
    """One reason a request was refused: where (``loc``), what (``msg``, ``type``) and,
    for a short scalar, an excerpt of the value sent (``input``)."""

    loc: list[str | int]
    msg: str
    type: str
    input: str | int | float | bool | None = Field(
        None, description=f"The value sent, cut to {EXCERPT_CHARS} characters (absent for objects)"
    )


class ErrorBody(BaseModel):
    """Every error answer: a sentence, a name, and for invalid requests the reasons. Some
    errors add fields of their own (``retry_after``, ``known``, ``limit``...)."""

    model_config = ConfigDict(extra="allow")

    detail: str = Field(description="What went wrong, as a sentence")
    error: str = Field(description="The kind of error, e.g. NotFound or ValidationError")
    errors: list[ErrorItem] | None = Field(
        None, description="For invalid requests: each offending field"
    )


# Names for HTTP errors raised by routes (HTTPException), when the phrase would not do.
_ERROR_NAMES = {413: "RequestTooLarge", 422: "InvalidRequest"}


def error_name(status: int) -> str:
    if status in _ERROR_NAMES:
        return _ERROR_NAMES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "HTTPError"
    return "".join(word.capitalize() for word in phrase.replace("-", " ").split())


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


async def http_error(request: Request, exc: Exception) -> Response:
    """An HTTPException as ``{detail, error}`` (its headers kept); a 405 lists in ``Allow``
    every method the path has, not just those of the first route that matched it."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    status = exc.status_code
    if status in (204, 304):
        return Response(status_code=status, headers=headers)
    detail: Any = exc.detail
    if status == 405:
        allowed = allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed here; this path takes {', '.join(allowed)}."
    if not isinstance(detail, str):
        detail = str(detail)
    body = {"detail": detail, "error": error_name(status)}
    return JSONResponse(body, status_code=status, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app answers on this request's path."""
    # The app's own path of the request, also when raised inside a mount (static files).
    root = str(request.scope.get("app_root_path", request.scope.get("root_path", "")))
    path = request.scope["path"]
    path = path[len(root) :] if root and path.startswith(root) else path
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        pattern = getattr(route, "path_regex", None)
        if pattern is None or not pattern.match(path):
            continue
        if isinstance(route.original_route, Mount):  # static files
            methods |= {"GET", "HEAD"}
        else:
            methods |= set(route.methods or ())
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


async def request_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 in the one error schema: a sentence naming the fields, and each error with at
    most a short excerpt of what was sent (never the whole input back)."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    items = [_error_item(error) for error in errors[:MAX_LISTED_ERRORS]]
    reasons = "; ".join(f"{_where(item)}: {item.msg}" for item in items[:5])
    more = len(errors) - min(len(errors), 5)
    detail = f"Invalid request: {reasons}" + (f" (and {more} more)." if more else ".")
    body = ErrorBody(detail=detail, error="ValidationError", errors=items)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422)


def _where(item: ErrorItem) -> str:
    return ".".join(str(part) for part in item.loc) or "request"


def _error_item(error: Any) -> ErrorItem:
    loc = [
        part if isinstance(part, int) and not isinstance(part, bool) else _excerpt(str(part), 100)
        for part in error.get("loc", ())
    ]
    msg = str(error.get("msg", "Invalid value"))
    reason = (error.get("ctx") or {}).get("error")
    if error.get("type") == "json_invalid" and reason:
        msg = f"{msg} ({reason})"
    value = error.get("input")
    short: str | int | float | bool | None = None
    if isinstance(value, str):
        short = _excerpt(value)
    elif isinstance(value, bool) or (isinstance(value, float) and math.isfinite(value)):
        short = value
    elif isinstance(value, int | float):  # NaN is no JSON; 10**4000 no excerpt
        text = str(value)
        short = value if isinstance(value, int) and len(text) <= 30 else _excerpt(text, 30)
    return ErrorItem(
        loc=loc, msg=_excerpt(msg, 300), type=str(error.get("type", "value_error")), input=short
    )
