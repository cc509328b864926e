"""Server-rendered pages."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from tzoo.runtime.manager import ModelManager
from tzoo.web.deps import ManagerDep
from tzoo.web.tools import TOOLS

router = APIRouter(tags=["pages"], include_in_schema=False)


def home_context(manager: ModelManager, **extra: Any) -> dict[str, Any]:
    return {"tools": TOOLS, "models": manager.status(), "budget": manager.budget_bytes, **extra}


def render_home(
    request: Request, manager: ModelManager, *, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    templates = request.app.state.templates
    context = home_context(manager, **extra)
    return templates.TemplateResponse(request, "home.html", context, status_code=status_code)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, manager: ManagerDep) -> HTMLResponse:
    return render_home(request, manager)
