"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Preloaded models are not ready yet"}})
def ready(request: Request) -> JSONResponse:
    """200 once every preloaded model is loaded; 503 (with each model's state) until then."""
    preloader = request.app.state.preloader
    body = {
        "ready": preloader.ready,
        "models": preloader.states,
        "errors": preloader.errors,
    }
    return JSONResponse(body, status_code=200 if preloader.ready else 503)
