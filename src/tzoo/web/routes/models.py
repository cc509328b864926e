"""The model catalogue over REST: list (anyone), load and unload (the operator only).

Loading and unloading are the operator's: an admin account (its session with the CSRF
token, or its API token) or the holder of TZOO_API_KEY; anyone else gets 401/403 with a
sentence. Through the web, local paths load only from under TZOO_MODEL_DIRS (see
``tzoo.service.model_loading``), and loads run in a small pool of their own: the route
awaits the load without holding a request thread, for at most TZOO_HUB_LOAD_TIMEOUT
seconds (then 504; the load goes on).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tzoo.runtime.devices import dtype_name
from tzoo.runtime.manager import ModelStatus
from tzoo.service.model_loading import ModelLoader, public_statuses, web_model_name
from tzoo.web.deps import AdminDep, AuthDep, ManagerDep, SessionDep, SettingsDep

router = APIRouter(prefix="/api/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Not logged in: loading and unloading are the operator's"},
    403: {
        "description": "Not the operator, a missing CSRF token, or a local path outside "
        "TZOO_MODEL_DIRS (one answer for every such path)"
    },
    404: {"description": "Unknown model; the body lists the known ones"},
    409: {"description": "The model is in use (the body names its users)"},
    413: {"description": "The model is over the memory budget or size limit"},
    422: {"description": "The files are not a loadable model, or the name is malformed"},
    503: {
        "description": "The model's package is not installed, the hub is unreachable, or "
        "the load pool's waiting line is full (see Retry-After)"
    },
}
_LOAD_ERRORS: dict[int | str, dict[str, str]] = {
    **_ERRORS,
    504: {"description": "The load took longer than TZOO_HUB_LOAD_TIMEOUT; it goes on"},
}


def get_loader(request: Request) -> ModelLoader:
    return request.app.state.model_loader


LoaderDep = Annotated[ModelLoader, Depends(get_loader)]


class ModelPublic(BaseModel):
    name: str
    description: str
    architecture: str
    loaded: bool
    available: bool
    unavailable_reason: str
    size_bytes: int | None
    source: str
    tags: list[str]
    device: str | None
    dtype: str | None

    @classmethod
    def of(cls, status: ModelStatus) -> ModelPublic:
        return cls(**{**status.__dict__, "tags": list(status.tags)})


class LoadedModelPublic(BaseModel):
    name: str
    architecture: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    vocab_size: int
    device: str
    dtype: str
    size_bytes: int
    source: str
    memory_used_bytes: int
    memory_budget_bytes: int


class UnloadPublic(BaseModel):
    name: str
    unloaded: bool
    memory_used_bytes: int


@router.get("", response_model=list[ModelPublic])
def list_models(manager: ManagerDep, auth: AuthDep) -> list[ModelPublic]:
    """Every catalogue model (and any other loaded one), whether loaded, and its size.
    Where a model's files are (``source``) is shown to the operator; others see
    "bundled package ...", "local directory", a hub id, and no models loaded from a
    local path."""
    rows = public_statuses(manager.status(), operator=auth.is_admin)
    return [ModelPublic.of(s) for s in rows]


@router.post("/{name:path}/load", response_model=LoadedModelPublic, responses=_LOAD_ERRORS)
async def load_model(
    name: str,
    _operator: AdminDep,
    session: SessionDep,
    manager: ManagerDep,
    loader: LoaderDep,
    settings: SettingsDep,
) -> LoadedModelPublic:
    """Load a model (a catalogue name, a hub id, or a local directory under
    TZOO_MODEL_DIRS) into memory. The operator only. Loads of one name at once share one
    load; more than the pool takes get 503 with Retry-After; a load that takes longer
    than TZOO_HUB_LOAD_TIMEOUT answers 504 and goes on."""
    # Who asked is known: give the database connection back before the long wait.
    await run_in_threadpool(session.close)
    handle = await loader.load(web_model_name(name, settings, manager))
    summary = handle.summary()
    summary["dtype"] = dtype_name(handle.dtype)
    return LoadedModelPublic(
        **summary,
        memory_used_bytes=manager.used_bytes,
        memory_budget_bytes=manager.budget_bytes,
    )


@router.post("/{name:path}/unload", response_model=UnloadPublic, responses=_ERRORS)
def unload_model(
    name: str, _operator: AdminDep, manager: ManagerDep, settings: SettingsDep
) -> UnloadPublic:
    """Free a model's memory. The operator only. Unloading a model that is not loaded is
    not an error. A model in use is not unloaded and does not wait: 409 naming its users
    (token-wheel sessions, running analyses); try again when they end, or delete the
    sessions."""
    unloaded = manager.unload(web_model_name(name, settings, manager))
    return UnloadPublic(name=name, unloaded=unloaded, memory_used_bytes=manager.used_bytes)
