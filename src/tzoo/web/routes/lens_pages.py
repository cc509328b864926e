"""The lens page (/lens): logit lens, tuned lens and Patchscope explanations, streamed.

Thin: the page is a form and an empty results area; its script (static/js/lens/) talks to
the WebSocket at /ws (routes/lens_service.py), which queues the job and streams progress,
rows and the result. Model groups, the API-key requirement and the text limit arrive in
the socket's first message, so the page needs nothing from the model manager.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/lens", response_class=HTMLResponse)
def lens_page(request: Request) -> HTMLResponse:
    # For the character counter before the socket connects (connection_established
    # repeats it).
    context = {"max_text_length": request.app.state.settings.max_text_length}
    return request.app.state.templates.TemplateResponse(request, "lens/lens.html", context)
