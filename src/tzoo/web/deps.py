"""Typed dependencies for routes: settings, the model manager, a database session, the
current user (API token or login cookie) and the CSRF check; plus the template context
that lets every page show who is logged in."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from tzoo.config import Settings
from tzoo.runtime.manager import ModelManager
from tzoo.store.accounts import find_api_token, find_login_session
from tzoo.store.models import LoginSession, User
from tzoo.web.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    PENDING_CSRF_COOKIE,
    SESSION_COOKIE,
    new_csrf_nonce,
    nonce_from_cookie,
    sign_csrf_nonce,
    tokens_match,
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
SessionDep = Annotated[Session, Depends(get_session)]


# --- who is asking -------------------------------------------------------------------

AuthVia = Literal["token", "session", "api_key"]
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# What a cross-site HTML form can send without a CORS preflight.
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
LOGIN_REQUIRED = "Log in or send an API token."
CSRF_FAILED_FORM = (
    "This form has expired or was sent from another site; reload the page and try again."
)
CSRF_FAILED_API = (
    f"Missing or wrong CSRF token: send the {CSRF_HEADER} header with the value of the "
    'page\'s <meta name="csrf-token">, or authenticate with "Authorization: Bearer".'
)


ADMIN_REQUIRED = (
    "Only an operator may do this: an admin account (made with `tzoo users create "
    "--admin`) or the holder of the server's TZOO_API_KEY."
)


@dataclass(frozen=True)
class Auth:
    """How the current request is authenticated: by an API token, a login session
    (``login_session`` set), the operator's TZOO_API_KEY (``via`` "api_key", no user), or
    not at all (``user`` None)."""

    user: User | None = None
    via: AuthVia | None = None
    login_session: LoginSession | None = None

    @property
    def is_admin(self) -> bool:
        return self.via == "api_key" or (self.user is not None and self.user.is_admin)

    @property
    def client_key(self) -> str | None:
        """Who this is for per-client quotas: the account, the operator, or None
        (anonymous: the caller then counts by address)."""
        if self.via == "api_key":
            return "operator"
        return f"user:{self.user.id}" if self.user is not None else None


def authenticate(request: Request, session: Session) -> Auth:
    """Resolve the request's user once (cached in ``request.state.auth``; ``.user`` too,
    for templates). A Bearer token that is not valid is a 401, never a silent fall back
    to anonymous, so a script with a revoked token learns it at once."""
    cached = getattr(request.state, "auth", None)
    if isinstance(cached, Auth):
        return cached
    auth = _bearer_auth(request, session) or _cookie_auth(request, session) or Auth()
    request.state.auth = auth
    request.state.user = auth.user
    return auth


def _bearer_auth(request: Request, session: Session) -> Auth | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    credentials = credentials.strip()
    api_key = request.app.state.settings.api_key
    if api_key and hmac.compare_digest(credentials.encode(), api_key.encode()):
        return Auth(via="api_key")
    row = find_api_token(session, credentials)
    if row is None:
        raise HTTPException(
            401,
            "This API token is not valid: it was revoked or mistyped.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return Auth(user=row.user, via="token")


def _cookie_auth(request: Request, session: Session) -> Auth | None:
    token = request.cookies.get(SESSION_COOKIE)
    row = find_login_session(session, token) if token else None
    return Auth(user=row.user, via="session", login_session=row) if row else None


def get_auth(request: Request, session: SessionDep) -> Auth:
    return authenticate(request, session)


def client_address(request: Request) -> str:
    """The caller's address: the connection's, or a trusted proxy's X-Forwarded-For
    (uvicorn rewrites ``request.client`` only for TZOO_FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"


def web_model(request: Request, name: str) -> str:
    """A model name from a web request, made safe to hand the model manager: a catalogue
    name, a hub id, or a path under TZOO_MODEL_DIRS (any other path is one uniform 403,
    whatever is there), loaded through the bounded load pool so a slow hub never holds
    more than a few request threads (503 when its line is full, 504 after
    TZOO_HUB_LOAD_TIMEOUT)."""
    from tzoo.service.model_loading import web_model_name

    state = request.app.state
    checked = web_model_name(name, state.settings, state.manager)
    state.model_loader.ensure_loaded(checked)
    return checked


def client_key(request: Request, auth: Auth) -> str:
    """Who a per-client quota counts: ``user:<id>`` for an account, ``operator`` for the
    TZOO_API_KEY holder, else ``ip:<address>`` for an anonymous caller."""
    return auth.client_key or f"ip:{client_address(request)}"


def get_client_key(request: Request, auth: Annotated[Auth, Depends(get_auth)]) -> str:
    return client_key(request, auth)


def get_current_user(auth: Annotated[Auth, Depends(get_auth)]) -> User | None:
    return auth.user


def require_user(request: Request, auth: Annotated[Auth, Depends(get_auth)]) -> User:
    """The user, or: 401 for the API, a redirect to the login page for pages."""
    if auth.user is not None:
        return auth.user
    if request.url.path.startswith("/api/"):
        raise HTTPException(401, LOGIN_REQUIRED, headers={"WWW-Authenticate": "Bearer"})
    # After logging in, come back to the page; a POST cannot be replayed, so go home.
    login = (
        "/login?" + urlencode({"next": request.url.path}) if request.method == "GET" else "/login"
    )
    raise HTTPException(303, "Log in first.", headers={"Location": login})


async def check_csrf(request: Request, auth: Annotated[Auth, Depends(get_auth)]) -> None:
    """403 unless an unsafe request carries the right CSRF token (see web/security.py):
    the session's token for a logged-in browser, the signed anonymous nonce for an
    anonymous form. Bearer requests and anonymous non-form requests (JSON: they carry no
    credentials to abuse and cannot be sent cross-site without CORS) pass."""
    if request.method in _SAFE_METHODS or auth.via in ("token", "api_key"):
        return
    is_form = _is_form(request)
    if auth.login_session is not None:
        ok = tokens_match(await submitted_csrf(request), auth.login_session.csrf_token)
    elif is_form:
        ok = anonymous_csrf_ok(request, await submitted_csrf(request))
    else:
        ok = True
    if not ok:
        raise HTTPException(403, CSRF_FAILED_FORM if is_form else CSRF_FAILED_API)


def require_admin(
    auth: Annotated[Auth, Depends(get_auth)], _csrf: Annotated[None, Depends(check_csrf)]
) -> Auth:
    """The operator, or 401 (nobody logged in) / 403 (logged in, not an operator). Its
    writes from a browser carry the CSRF token like every other cookie write."""
    if auth.is_admin:
        return auth
    if auth.user is None:
        raise HTTPException(401, ADMIN_REQUIRED, headers={"WWW-Authenticate": "Bearer"})
    raise HTTPException(403, ADMIN_REQUIRED)


def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in _FORM_TYPES


async def submitted_csrf(request: Request) -> str | None:
    """The token from the X-CSRF-Token header, else from the form's csrf_token field."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if _is_form(request) and not request.headers.get("content-type", "").startswith("text/"):
        value = (await request.form()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


def anonymous_csrf_ok(request: Request, submitted: str | None) -> bool:
    """Whether ``submitted`` is the nonce signed into this browser's ``tzoo_csrf`` cookie."""
    secret = request.app.state.settings.secret_key
    nonce = nonce_from_cookie(request.cookies.get(CSRF_COOKIE), secret)
    return tokens_match(submitted, nonce)


def anonymous_csrf_token(request: Request) -> str:
    """The anonymous CSRF nonce for this browser: the one in its cookie, else a new one
    whose cookie CsrfCookieMiddleware sends with the response."""
    state = request.scope.setdefault("state", {})
    settings = request.app.state.settings
    nonce = nonce_from_cookie(request.cookies.get(CSRF_COOKIE), settings.secret_key)
    if nonce is None and PENDING_CSRF_COOKIE in state:
        nonce = nonce_from_cookie(state[PENDING_CSRF_COOKIE], settings.secret_key)
    if nonce is None:
        nonce = new_csrf_nonce()
        state[PENDING_CSRF_COOKIE] = sign_csrf_nonce(nonce, settings.secret_key)
    return nonce


def template_context(request: Request) -> dict[str, Any]:
    """What every template sees: ``current_user`` (User or None) and ``csrf_token`` (the
    value forms put in their hidden ``csrf_token`` field and base.html in its meta tag)."""
    auth = getattr(request.state, "auth", None)
    if not isinstance(auth, Auth):
        auth = _auth_for_page(request)
    if auth.login_session is not None:
        csrf_token: str | None = auth.login_session.csrf_token
    elif auth.via in ("token", "api_key"):
        csrf_token = None
    else:
        csrf_token = anonymous_csrf_token(request)
    return {"current_user": auth.user, "csrf_token": csrf_token}


def _auth_for_page(request: Request) -> Auth:
    """For pages whose route did not ask who the user is: look it up for the nav."""
    with request.app.state.session_factory() as session:
        try:
            return authenticate(request, session)
        except HTTPException:
            return Auth()


def page_auth(request: Request) -> Auth:
    """Who is looking at a page: the request's Auth, looked up if its route did not ask
    (anonymous for a token that is not valid)."""
    auth = getattr(request.state, "auth", None)
    return auth if isinstance(auth, Auth) else _auth_for_page(request)


CurrentUserDep = Annotated[User | None, Depends(get_current_user)]
RequiredUserDep = Annotated[User, Depends(require_user)]
AuthDep = Annotated[Auth, Depends(get_auth)]
CsrfCheckDep = Annotated[None, Depends(check_csrf)]
AdminDep = Annotated[Auth, Depends(require_admin)]
ClientKeyDep = Annotated[str, Depends(get_client_key)]
