"""One place that turns errors into HTTP answers with a sentence, never a trace."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from loguru import logger

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
from tzoo.runtime.manager import ModelBusyError
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
    (ModelUnavailableError, 503),
    (InputTooLongError, 413),
    (EmptyInputError, 422),
    (SessionNotFoundError, 404),
    (TooManySessionsError, 429),
    (ContextTooLongError, 413),
    (QueueFullError, 503),
    (RateLimitedError, 429),
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
