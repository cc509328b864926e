"""Transport guards around the whole app: a request-body size limit and security headers.

Both are plain ASGI middleware that ``create_app`` puts outside everything else (even
Starlette's error middleware), so every answer (pages, API, static files, 404s, 405s,
413s and 500s) carries the headers, and no route ever reads more body than the limit.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tzoo.config import Settings

CSP_NONCE = "csp_nonce"

# What every page may load: only this server's own files, plus the inline scripts (import
# maps and module starters) that carry this response's nonce. No inline styles: the views
# set sizes and colours through CSSOM (element.style), which the policy allows.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; "
    "script-src 'self' 'nonce-{nonce}'; "
    "style-src 'self'; "
    "img-src 'self' data: blob:; "
    "font-src 'self'; "
    "connect-src 'self'; "
    "object-src 'none'; "
    "base-uri 'self'; "
    "form-action 'self'; "
    "frame-ancestors 'none'"
)
# For a self-contained HTML document (a report with its <style> inline) served as is: its
# own styles and nothing else, no script at all.
SELF_CONTAINED_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:g} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:g} KiB"


def too_large_sentence(limit: int) -> str:
    return (
        f"The request body is larger than {_mib(limit)}, the most this server reads "
        "(TZOO_MAX_BODY_BYTES)."
    )


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit; an HTTPException, so
    the route's error handling answers 413 with the usual JSON body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_sentence(limit))


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes`` (``limits`` by path prefix override it),
    without reading the rest: at once when Content-Length says so, else as soon as the
    bytes that stream through ``receive`` pass the limit."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = dict(limits or {})

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.limits.items():
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _send_too_large(send, limit)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            # Read outside the routes' error handling (a middleware): answer here.
            if started:
                raise
            await _send_too_large(send, limit)


async def _send_too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": too_large_sentence(limit), "error": "RequestTooLarge"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read, so this connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    """Adds the Content-Security-Policy (with a fresh script nonce per request, which
    templates read as ``csp_nonce``), frame, sniffing and referrer headers to every HTTP
    answer. A header a route set itself is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        scope.setdefault("state", {})[CSP_NONCE] = nonce
        policy = CONTENT_SECURITY_POLICY.format(nonce=nonce)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = policy
                for name, value in SECURITY_HEADERS.items():
                    if name.lower() not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def csp_context(request: Request) -> dict[str, str]:
    """Template context: ``csp_nonce``, the nonce inline ``<script>`` tags must carry."""
    return {CSP_NONCE: str(request.scope.get("state", {}).get(CSP_NONCE, ""))}


# Multipart framing and the form's text fields around the two uploaded files.
FORM_OVERHEAD_BYTES = 64 * 1024


def body_limits(settings: Settings) -> dict[str, int]:
    """Paths that may take more than TZOO_MAX_BODY_BYTES: the validation upload takes
    two files of TZOO_VALIDATION_MAX_UPLOAD_KB each (its own 413 names that setting)."""
    upload = 2 * settings.validation_max_upload_kb * 1024 + FORM_OVERHEAD_BYTES
    return {"/api/validations": max(settings.max_body_bytes, upload)}


class GuardedFastAPI(FastAPI):
    """FastAPI with the transport guards outside even Starlette's error middleware, so a
    500 carries the security headers too and no error path reads an oversized body."""

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        settings: Settings = self.state.settings
        limited = BodyLimitMiddleware(
            stack, max_bytes=settings.max_body_bytes, limits=body_limits(settings)
        )
        return SecurityHeadersMiddleware(limited)
