"""Accounts: sign up, log in, log out, the account page, and personal API tokens.

Pages post HTML forms (CSRF-checked, see web/security.py) and answer with the form again
and a sentence when something is wrong; the API under /api answers JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Header, HTTPException, Path, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from tzoo.config import Settings
from tzoo.service.quotas import QuotaExceededError, Quotas
from tzoo.store.accounts import (
    AccountError,
    UsernameTakenError,
    check_username,
    create_api_token,
    create_user,
    end_login_session,
    get_user,
    list_api_tokens,
    normalise_username,
    revoke_api_token,
    set_password_hash,
    start_login_session,
)
from tzoo.store.models import ApiToken, User
from tzoo.web.deps import (
    CSRF_FAILED_FORM,
    Auth,
    AuthDep,
    CsrfCheckDep,
    RequiredUserDep,
    SessionDep,
    SettingsDep,
    anonymous_csrf_ok,
    client_address,
)
from tzoo.web.security import (
    CSRF_COOKIE,
    PASSWORD_MAX_LENGTH,
    SESSION_COOKIE,
    LoginLimiter,
    LoginThrottledError,
    PasswordRuleError,
    check_new_password,
    clear_cookie,
    hash_password,
    needs_rehash,
    safe_next,
    set_session_cookie,
    tokens_match,
    verify_nothing,
    verify_password,
)

router = APIRouter()
pages = APIRouter(tags=["accounts"], include_in_schema=False)
api = APIRouter(prefix="/api", tags=["accounts"])

WRONG_CREDENTIALS = "Wrong username or password."
SIGNUP_WINDOW_SECONDS = 3600
TOO_MANY_SIGNUPS = (
    "Too many accounts were created from your address in the last hour "
    "(TZOO_SIGNUPS_PER_HOUR); try again in {retry_after} seconds."
)
TOKENS_NEED_A_BROWSER = (
    "API tokens are created and revoked from a logged-in browser session (the account "
    "page), not with another API token."
)
FormField = Annotated[str, Form()]
# An API token row id (32-bit in the database: a bigger one is no id, but a 422).
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    templates = request.app.state.templates
    response: HTMLResponse = templates.TemplateResponse(
        request, f"auth/{template}", context, status_code=status_code, headers=headers
    )
    return response


def _logged_in(
    request: Request, session: Session, settings: Settings, user: User, next_path: str
) -> RedirectResponse:
    """Start a fresh session (a new token on every login: no session fixation), end the
    browser's previous one, and go where the user was heading."""
    old_token = request.cookies.get(SESSION_COOKIE)
    if old_token:
        end_login_session(session, old_token)
    _, token = start_login_session(session, user)
    response = RedirectResponse(next_path, status_code=303)
    set_session_cookie(response, token, settings)
    clear_cookie(response, CSRF_COOKIE, settings)
    return response


# --- sign up -------------------------------------------------------------------------


@pages.get("/signup", response_class=HTMLResponse)
def signup_page(request: Request, auth: AuthDep, next: str = "/") -> Response:
    if auth.user is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _render(request, "signup.html", {"next": safe_next(next), "username": ""})


@pages.post("/signup", response_class=HTMLResponse)
def signup(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: FormField = "",
    password: FormField = "",
    password_confirm: FormField = "",
    csrf_token: FormField = "",
    next: FormField = "/",
) -> Response:
    """Create an account and log it in. 400 for a bad username or password, 409 for a
    username that is taken, 403 for a form without its CSRF token, 429 (Retry-After)
    past TZOO_SIGNUPS_PER_HOUR accounts from this address."""
    context = {"next": safe_next(next), "username": username}
    if not anonymous_csrf_ok(request, csrf_token):
        return _render(
            request, "signup.html", {**context, "error": CSRF_FAILED_FORM}, status_code=403
        )
    quotas: Quotas = request.app.state.quotas
    try:
        # Reserved before the account exists, so parallel sign-ups cannot pass the limit
        # together; given back when the sign-up is refused.
        with quotas.charge(
            f"signup:{client_address(request)}",
            settings.signups_per_hour or None,  # 0: no limit
            SIGNUP_WINDOW_SECONDS,
            refusal=TOO_MANY_SIGNUPS,
        ):
            check_username(username)
            check_new_password(password)
            if password != password_confirm:
                raise PasswordRuleError("The two passwords differ; type the same one twice.")
            user = create_user(session, username=username, password_hash=hash_password(password))
    except QuotaExceededError as error:
        return _render(
            request,
            "signup.html",
            {**context, "error": str(error)},
            status_code=429,
            headers={"Retry-After": str(error.retry_after)},
        )
    except UsernameTakenError as error:
        return _render(request, "signup.html", {**context, "error": str(error)}, status_code=409)
    except (AccountError, PasswordRuleError) as error:
        return _render(request, "signup.html", {**context, "error": str(error)}, status_code=400)
    return _logged_in(request, session, settings, user, context["next"])


# --- log in / log out ----------------------------------------------------------------


@pages.get("/login", response_class=HTMLResponse)
def login_page(request: Request, auth: AuthDep, next: str = "/") -> Response:
    if auth.user is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _render(request, "login.html", {"next": safe_next(next), "username": ""})


@pages.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: FormField = "",
    password: FormField = "",
    csrf_token: FormField = "",
    next: FormField = "/",
) -> Response:
    """Log in. One message for every wrong answer (no hint whether the username exists);
    429 with Retry-After and a sentence when LoginLimiter (web/security.py) says wait:
    too many failures from this address, or on this account from it."""
    context = {"next": safe_next(next), "username": username}
    if not anonymous_csrf_ok(request, csrf_token):
        return _render(
            request, "login.html", {**context, "error": CSRF_FAILED_FORM}, status_code=403
        )
    limiter: LoginLimiter = request.app.state.login_limiter
    try:
        attempt = limiter.begin(normalise_username(username), client_address(request))
    except LoginThrottledError as error:
        return _render(
            request,
            "login.html",
            {**context, "error": str(error)},
            status_code=429,
            headers={"Retry-After": str(error.retry_after)},
        )
    user = _check_credentials(session, username, password)
    if user is None:
        limiter.failed(attempt)
        return _render(
            request, "login.html", {**context, "error": WRONG_CREDENTIALS}, status_code=401
        )
    limiter.succeeded(attempt)
    if needs_rehash(user.password_hash):
        set_password_hash(session, user, hash_password(password))
    return _logged_in(request, session, settings, user, context["next"])


def _check_credentials(session: Session, username: str, password: str) -> User | None:
    """The user these credentials name, or None; takes about as long either way."""
    if len(password) > PASSWORD_MAX_LENGTH:
        return None  # no such password was ever accepted; do not hash megabytes
    user = get_user(session, username) if username.strip() else None
    if user is None:
        verify_nothing(password)
        return None
    return user if verify_password(user.password_hash, password) else None


@pages.post("/logout")
def logout(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    auth: AuthDep,
    csrf_token: FormField = "",
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> Response:
    """End the browser's session for good (its row is deleted, so a copied cookie stops
    working too). A browser that is already logged out is simply sent home."""
    if auth.login_session is not None:
        if not tokens_match(x_csrf_token or csrf_token, auth.login_session.csrf_token):
            raise HTTPException(403, CSRF_FAILED_FORM)
        end_login_session(session, request.cookies[SESSION_COOKIE])
    response = RedirectResponse("/", status_code=303)
    clear_cookie(response, SESSION_COOKIE, settings)
    return response


# --- account page --------------------------------------------------------------------


def _account_page(
    request: Request,
    session: Session,
    user: User,
    *,
    new_token: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    context = {"tokens": list_api_tokens(session, user), "new_token": new_token, "error": error}
    return _render(request, "account.html", context, status_code=status_code)


@pages.get("/account", response_class=HTMLResponse)
def account(request: Request, session: SessionDep, user: RequiredUserDep) -> HTMLResponse:
    """The user's API tokens, a form to create one and buttons to revoke them."""
    return _account_page(request, session, user)


@pages.post("/account/tokens", response_class=HTMLResponse)
def account_create_token(
    request: Request,
    session: SessionDep,
    user: RequiredUserDep,
    auth: AuthDep,
    _csrf: CsrfCheckDep,
    name: FormField = "",
) -> HTMLResponse:
    """Create a token and show it, this once, on the account page."""
    _require_browser_session(auth)
    try:
        _, token = create_api_token(session, user, name)
    except AccountError as error:
        return _account_page(request, session, user, error=str(error), status_code=400)
    return _account_page(request, session, user, new_token=token)


@pages.post("/account/tokens/{token_id}/revoke")
def account_revoke_token(
    token_id: TokenId, session: SessionDep, user: RequiredUserDep, _csrf: CsrfCheckDep
) -> RedirectResponse:
    if not revoke_api_token(session, user, token_id):
        raise HTTPException(404, "You have no API token with this id.")
    return RedirectResponse("/account", status_code=303)


def _require_browser_session(auth: Auth) -> None:
    """A leaked token must not be able to mint tokens that outlive its revocation."""
    if auth.via != "session":
        raise HTTPException(403, TOKENS_NEED_A_BROWSER)


# --- API -----------------------------------------------------------------------------


class MePublic(BaseModel):
    username: str


class ApiTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100, description="What the token is for.")


class ApiTokenPublic(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="The token's first characters, to recognise it.")
    created_at: datetime
    last_used_at: datetime | None

    @classmethod
    def of(cls, row: ApiToken) -> ApiTokenPublic:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
        )


class ApiTokenCreated(BaseModel):
    id: int
    name: str
    token: str = Field(description="The token itself; shown this once and never again.")
    prefix: str
    created_at: datetime


_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not logged in and no valid API token"}
}


@api.get("/me", responses=_UNAUTHORIZED)
def me(user: RequiredUserDep) -> MePublic:
    """Who the session cookie or the API token belongs to."""
    return MePublic(username=user.username)


@api.post(
    "/tokens",
    status_code=201,
    responses={
        **_UNAUTHORIZED,
        403: {"description": "CSRF check failed, or called with an API token"},
    },
)
def create_token(
    body: ApiTokenCreate,
    session: SessionDep,
    user: RequiredUserDep,
    auth: AuthDep,
    _csrf: CsrfCheckDep,
) -> ApiTokenCreated:
    """Create a personal API token; the response holds the token, shown only this once."""
    _require_browser_session(auth)
    try:
        row, token = create_api_token(session, user, body.name)
    except AccountError as error:
        raise HTTPException(422, str(error)) from None
    return ApiTokenCreated(
        id=row.id, name=row.name, token=token, prefix=row.prefix, created_at=row.created_at
    )


@api.get("/tokens", responses=_UNAUTHORIZED)
def list_tokens(session: SessionDep, user: RequiredUserDep) -> list[ApiTokenPublic]:
    """The user's tokens (names and prefixes; never the tokens themselves)."""
    return [ApiTokenPublic.of(row) for row in list_api_tokens(session, user)]


@api.delete(
    "/tokens/{token_id}",
    status_code=204,
    responses={**_UNAUTHORIZED, 404: {"description": "No such token of yours"}},
)
def delete_token(
    token_id: TokenId, session: SessionDep, user: RequiredUserDep, _csrf: CsrfCheckDep
) -> Response:
    """Revoke a token at once. Works with a token too (a token may revoke itself)."""
    if not revoke_api_token(session, user, token_id):
        raise HTTPException(404, "You have no API token with this id.")
    return Response(status_code=204)


router.include_router(pages)
router.include_router(api)
