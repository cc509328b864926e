"""Liveness and readiness probes. Both are ``async def``: they run on the event loop,
never wait for a request thread, so they answer in milliseconds whatever the models are
doing (loads run in their own pool, analyses in theirs)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tzoo.service.model_loading import public_model_label, scrub_paths

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Preloaded models are not ready yet"}})
async def ready(request: Request) -> JSONResponse:
    """200 once every preloaded model is loaded; 503 (with each model's state) until then.
    Anyone may ask, so a model preloaded from a local path shows as "local directory" and
    errors show no server paths (the server log has them)."""
    preloader = request.app.state.preloader
    body = {
        "ready": preloader.ready,
        "models": {public_model_label(n): s for n, s in dict(preloader.states).items()},
        "errors": {
            public_model_label(n): scrub_paths(e) for n, e in dict(preloader.errors).items()
        },
    }
    return JSONResponse(body, status_code=200 if preloader.ready else 503)
