"""The model catalogue over REST: list, load, unload."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from tzoo.runtime.devices import dtype_name
from tzoo.runtime.manager import ModelStatus
from tzoo.web.deps import ManagerDep

router = APIRouter(prefix="/api/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "Unknown model; the body lists the known ones"},
    409: {"description": "The model is in use"},
    413: {"description": "The model is over the memory budget or size limit"},
    422: {"description": "The files are not a loadable model"},
    503: {"description": "The model's package is not installed or the hub is unreachable"},
}


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
def list_models(manager: ManagerDep) -> list[ModelPublic]:
    """Every catalogue model (and any other loaded one), whether loaded, and its size."""
    return [ModelPublic.of(s) for s in manager.status()]


@router.post("/{name:path}/load", response_model=LoadedModelPublic, responses=_ERRORS)
def load_model(name: str, manager: ManagerDep) -> LoadedModelPublic:
    """Load a model (a catalogue name, a local directory, or a hub id) into memory."""
    handle = manager.get(name)
    summary = handle.summary()
    summary["dtype"] = dtype_name(handle.dtype)
    return LoadedModelPublic(
        **summary,
        memory_used_bytes=manager.used_bytes,
        memory_budget_bytes=manager.budget_bytes,
    )


@router.post("/{name:path}/unload", response_model=UnloadPublic, responses=_ERRORS)
def unload_model(name: str, manager: ManagerDep) -> UnloadPublic:
    """Free a model's memory. Unloading a model that is not loaded is not an error."""
    unloaded = manager.unload(name)
    return UnloadPublic(name=name, unloaded=unloaded, memory_used_bytes=manager.used_bytes)
