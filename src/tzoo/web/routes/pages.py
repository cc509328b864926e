"""Server-rendered pages."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from tzoo.runtime.manager import ModelManager
from tzoo.service.model_loading import public_statuses
from tzoo.web.deps import ManagerDep, page_auth
from tzoo.web.tools import TOOLS

router = APIRouter(tags=["pages"], include_in_schema=False)


def home_context(manager: ModelManager, *, operator: bool = False, **extra: Any) -> dict[str, Any]:
    """What the home page shows; ``operator``: load/unload buttons and models' paths."""
    models = public_statuses(manager.status(), operator=operator)
    return {
        "tools": TOOLS,
        "models": models,
        "budget": manager.budget_bytes,
        "operator": operator,
        **extra,
    }


def render_home(
    request: Request, manager: ModelManager, *, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    templates = request.app.state.templates
    context = home_context(manager, operator=page_auth(request).is_admin, **extra)
    return templates.TemplateResponse(request, "home.html", context, status_code=status_code)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, manager: ManagerDep) -> HTMLResponse:
    return render_home(request, manager)
