"""The API docs page, served from vendored Swagger UI so it works with no internet."""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(include_in_schema=False)


@router.get("/favicon.ico")
def favicon() -> RedirectResponse:
    """Browsers ask for /favicon.ico whatever the page says; point them at ours."""
    return RedirectResponse("/static/favicon.svg", status_code=301)


_VENDOR = "/static/vendor/swagger-ui"


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI, started by a static script (the Content-Security-Policy allows no
    inline script without the page's nonce; FastAPI's page starts it inline)."""
    title = html.escape(f"{request.app.title} — API")
    openapi_url = html.escape(str(request.app.openapi_url), quote=True)
    return HTMLResponse(
        f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="{_VENDOR}/swagger-ui.css">
<link rel="icon" href="{_VENDOR}/favicon-32x32.png">
<title>{title}</title>
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
<script src="{_VENDOR}/swagger-ui-bundle.js"></script>
<script src="/static/js/docs.js"></script>
</body>
</html>
"""
    )
