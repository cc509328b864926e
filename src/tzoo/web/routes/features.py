"""Stored feature dashboards at their permalinks: ``GET /api/features/{slug}`` (JSON) and
``/features/{slug}`` (a page). They are made on the graph page (a node's dashboard is
stored the first time anyone opens it) and hold only the shipped corpus and the
transcoders' behaviour, so they are public."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from tzoo.service.dashboards import DASHBOARD_KIND, dashboard_of
from tzoo.store.artefacts import get_artefact
from tzoo.web.deps import SessionDep

router = APIRouter(prefix="/api", tags=["circuits"])
pages = APIRouter(tags=["pages"], include_in_schema=False)

NO_DASHBOARD = "No feature dashboard at this link."


def _dashboard(session: SessionDep, slug: str) -> dict[str, Any]:
    artefact = get_artefact(session, slug) if len(slug) <= 64 else None
    if artefact is None or artefact.kind != DASHBOARD_KIND:
        raise HTTPException(404, NO_DASHBOARD)
    return dashboard_of(artefact)


@router.get("/features/{slug}", responses={404: {"description": NO_DASHBOARD}})
def stored_dashboard(slug: str, session: SessionDep) -> dict[str, Any]:
    """A stored dashboard: frequency, top contexts with per-token activations, contexts by
    activation quantile, top and bottom logits, histogram; ``source`` names the transcoder
    set (and its fingerprint) and the corpus it was built from."""
    return _dashboard(session, slug)


@pages.get("/features/{slug}", response_class=HTMLResponse)
def dashboard_page(slug: str, request: Request, session: SessionDep) -> HTMLResponse:
    dashboard = _dashboard(session, slug)
    page = {
        "slug": slug,
        "api": f"/api/features/{slug}",
        "model_name": dashboard["model_name"],
        "layer": dashboard["layer"],
        "feature": dashboard["feature"],
        "transcoders": dashboard["source"].get("transcoders", ""),
    }
    return request.app.state.templates.TemplateResponse(
        request, "circuits/feature.html", {"feature": page}
    )
