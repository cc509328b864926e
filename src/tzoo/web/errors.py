"""One place that turns runtime errors into HTTP answers with a sentence, never a trace."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from loguru import logger

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

# Most specific first: the first matching class decides the status.
STATUS_OF: list[tuple[type[ModelError], int]] = [
    (UnknownModelError, 404),
    (ModelTooLargeError, 413),
    (ModelLoadError, 422),
    (DeviceError, 422),
    (UnsupportedArchitectureError, 422),
    (ModelBusyError, 409),
    (ModelUnavailableError, 503),
]


def status_for(exc: ModelError) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: ModelError) -> dict[str, object]:
    body: dict[str, object] = {"detail": exc.message, "error": type(exc).__name__}
    if isinstance(exc, UnknownModelError):
        body["known"] = exc.known
    if isinstance(exc, ModelTooLargeError):
        body.update(size_bytes=exc.size_bytes, limit_bytes=exc.limit_bytes, limit=exc.limit_name)
    return body


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ModelError)
    async def _model_error(_request: Request, exc: ModelError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error(
            "Unhandled error on {} {}", request.method, request.url.path
        )
        return JSONResponse(
            {"detail": "Internal error; the server log has the details.", "error": "InternalError"},
            status_code=500,
        )
