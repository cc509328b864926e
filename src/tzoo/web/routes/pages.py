"""Server-rendered pages."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from tzoo.web.deps import ManagerDep
from tzoo.web.tools import TOOLS

router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, manager: ManagerDep) -> HTMLResponse:
    templates = request.app.state.templates
    context = {"tools": TOOLS, "models": manager.status(), "budget": manager.budget_bytes}
    return templates.TemplateResponse(request, "home.html", context)
