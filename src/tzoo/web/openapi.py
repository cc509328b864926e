"""The OpenAPI contract's error half, in one place: every operation lists the error
statuses it can answer with, all in the one error schema (``ErrorBody``), so no route
file has to repeat them.

``document_errors(app)`` runs after the routers are included. It reads each route's
dependencies to tell which errors it can give (a path parameter: 404; a body: 400 and
413; any parameter: 422; who-is-asking: 401; the CSRF check or the operator role: 403;
the model manager or the lens queue: the model errors 404/409/413/422/503/504), adds the
common errors of a write (404, 409 and 429: per-client quotas) and those the route
declared itself, and gives every declared error without a body of its own the
``ErrorBody`` schema (and 429 its Retry-After header).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from tzoo.web.deps import check_csrf, get_auth, get_manager, require_admin, require_user
from tzoo.web.errors import ErrorBody, ErrorItem

REF = "#/components/schemas/{model}"
DESCRIPTIONS = {
    400: "The body could not be parsed (malformed JSON or form data)",
    401: "Not logged in, or the API token or key is missing or wrong",
    403: "Not allowed: the CSRF check failed, or the caller lacks the role",
    404: "Nothing at this path (or not visible to the caller)",
    409: "Conflicts with the current state (a model in use, transcoders not trained)",
    413: "The request body, the input or the model is over a limit",
    422: "An invalid request: the errors name each offending field",
    429: "Too many requests from this client; wait the seconds in Retry-After",
    503: "Not available right now (queue full, model unavailable); try again later",
    504: "A model load or a queued request took longer than its timeout",
    507: "The memory budget has no room for this (models in use hold it)",
}
MODEL_ERRORS = frozenset({404, 409, 413, 422, 503, 504})
# Dependencies (by name) that reach a model: the lens queue and model groups.
MODEL_USERS = frozenset({"get_queue", "get_groups"})
# Responses whose body is not an error: /ready answers 503 with its readiness report.
OWN_BODIES = {("/ready", "get", "503")}


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def error_statuses(route: RouteContext) -> set[int]:
    """The error statuses ``route`` can answer with, as far as its signature tells."""
    dependants = list(_dependants(route.dependant))
    calls = {d.call for d in dependants if d.call is not None}
    names = {getattr(call, "__name__", "") for call in calls}
    statuses = {int(code) for code in route.responses if str(code).isdigit()}
    statuses = {code for code in statuses if code >= 400}
    has_path = any(d.path_params for d in dependants)
    has_params = route.body_field is not None or any(
        d.path_params or d.query_params or d.header_params or d.cookie_params for d in dependants
    )
    if has_params:
        statuses.add(422)
    if has_path:
        statuses.add(404)
    if route.body_field is not None:
        statuses |= {400, 413}
    if calls & {get_auth, require_user, require_admin} or "require_api_key" in names:
        statuses.add(401)
    if calls & {check_csrf, require_admin}:
        statuses.add(403)
    if calls & {get_manager} or names & MODEL_USERS:
        statuses |= MODEL_ERRORS
    if set(route.methods or ()) & {"POST", "PUT", "PATCH"}:
        # Writes: a missing or changed thing, a state conflict, a per-client quota.
        statuses |= {404, 409, 429}
    return statuses


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}


def _is_validation_schema(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return str(schema.get("$ref", "")).endswith("/HTTPValidationError")


def _document(operation: dict[str, Any], statuses: set[int], key: tuple[str, str]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status in sorted(statuses):
        responses.setdefault(str(status), {"description": DESCRIPTIONS.get(status, "Error")})
    for code, response in responses.items():
        if not code.isdigit() or int(code) < 400:
            continue
        if (*key, code) in OWN_BODIES:
            ok = responses.get("200", {}).get("content")
            if ok:
                response.setdefault("content", ok)
            continue
        if "content" not in response or _is_validation_schema(response):
            response["content"] = _error_content()
        if code == "429":
            response.setdefault("headers", {})["Retry-After"] = {
                "description": "Seconds to wait before trying again",
                "schema": {"type": "integer"},
            }


def _uses_ref(schema: Any, name: str) -> bool:
    if isinstance(schema, dict):
        if schema.get("$ref") == REF.format(model=name):
            return True
        return any(_uses_ref(value, name) for value in schema.values())
    if isinstance(schema, list):
        return any(_uses_ref(value, name) for value in schema)
    return False


def document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` document every route's errors with ``ErrorBody``."""
    plan: dict[tuple[str, str], set[int]] = {}
    # Included routers' routes with their prefixes, router dependencies and responses.
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            for method in route.methods or ():
                plan[(str(route.path_format), method.lower())] = error_statuses(route)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorBody, ErrorItem):
            components[model.__name__] = model.model_json_schema(ref_template=REF)
        components["ErrorBody"].pop("$defs", None)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                statuses = plan.get((path, method), set())
                _document(operation, statuses, (path, method))
        for unused in ("HTTPValidationError", "ValidationError"):
            rest = {k: v for k, v in components.items() if k != unused}
            if unused in components and not _uses_ref({**schema, "components": rest}, unused):
                del components[unused]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
