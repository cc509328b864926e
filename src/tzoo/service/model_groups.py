"""Model groups for the lens service: a base model plus its lenses, named once in a JSON
file (TZOO_MODEL_GROUPS_FILE, else the bundled ``tzoo/data/model_groups.json``).

    {"default_group": "smollm2-135m",
     "groups": [{"name": "smollm2-135m", "model": "smollm2-135m",
                 "description": "...", "tuned_lens": null, "verbalize_layer": 3}]}

``tuned_lens``: the directory of the group's tuned lens, relative to the file; null looks
where ``tzoo lens train`` saves (TZOO_TUNED_LENS_DIR/<model>). The default group comes from
TZOO_DEFAULT_GROUP, then the file's ``default_group``, else there is none and requests must
name a group. Switching the default loads the new group (lazily: models load on first use
unless TZOO_LAZY_LOAD_MODEL is off) and keeps the old one in a CPU cache: on an accelerator
its weights move to host memory and come back on its next request; on a CPU they stay
loaded (the model manager's memory budget still decides what is evicted).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tzoo.analyses.tuned_lens import (
    CONFIG_FILE,
    LensNotFoundError,
    TunedLens,
    default_lens_dir,
)
from tzoo.config import Settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager
from tzoo.service.model_loading import public_model_label

BUNDLED_GROUPS = Path(str(files("tzoo") / "data" / "model_groups.json"))


class ModelGroupsFileError(ValueError):
    """The groups file is missing, not JSON, or not shaped as documented."""


class UnknownGroupError(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name, self.known = name, known
        super().__init__(
            f"No model group named {name!r}; the groups are: {', '.join(known) or 'none'}."
        )


class NoGroupError(ValueError):
    """A request named no group and the server has no default group."""


class TunedLensMissingError(LookupError):
    """The group has no trained tuned lens."""


class _GroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/-]+$")
    model: str = Field(min_length=1, max_length=1024)
    description: str = ""
    tuned_lens: str | None = None
    verbalize_layer: int | None = Field(None, ge=0)


class _GroupsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_group: str | None = None
    groups: list[_GroupSpec] = Field(min_length=1)


@dataclass(frozen=True)
class ModelGroup:
    name: str
    model: str
    description: str
    tuned_lens_dir: Path
    verbalize_layer: int | None  # None: a quarter of the way up the stack


class ModelGroups:
    """The groups, the current default, each group's loaded tuned lens, the CPU cache."""

    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        self.settings = settings
        self.manager = manager
        self.path = settings.model_groups_file or BUNDLED_GROUPS
        self.groups, file_default = _read(self.path, settings)
        default = settings.default_group or file_default
        if default is not None and default not in self.groups:
            where = "TZOO_DEFAULT_GROUP" if settings.default_group else f"{self.path}"
            raise ModelGroupsFileError(
                f"{where} names the default group {default!r}, which is not in {self.path} "
                f"(groups: {', '.join(self.groups)})."
            )
        self.current: str | None = default
        self._lock = threading.Lock()
        self._lenses: dict[str, TunedLens] = {}
        self._offloaded: set[str] = set()  # groups whose weights sit in host memory

    # -- lookups ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.groups)

    def resolve(self, name: str | None) -> ModelGroup:
        """The group ``name``, or the default one for None."""
        if name is None:
            if self.current is None:
                raise NoGroupError(
                    "This request names no model_group and the server has no default group; "
                    f"name one of: {', '.join(self.groups)}."
                )
            name = self.current
        group = self.groups.get(name)
        if group is None:
            raise UnknownGroupError(name, self.names())
        return group

    def describe(self, *, operator: bool = False) -> list[dict[str, object]]:
        """What /api/v2/models and the WebSocket list: one entry per group. A group whose
        model is a local path shows "local directory" to all but the ``operator``."""
        loaded = set(self.manager.loaded_names())
        rows = []
        for group in self.groups.values():
            handle_loaded = group.model in loaded
            rows.append(
                {
                    "name": group.name,
                    "model": group.model if operator else public_model_label(group.model),
                    "description": group.description,
                    "tuned_lens": self.has_tuned_lens(group),
                    "loaded": handle_loaded,
                    "cpu_cached": group.name in self._offloaded,
                    "current": group.name == self.current,
                    "n_layers": self._n_layers(group) if handle_loaded else None,
                    "verbalize_layer": group.verbalize_layer,
                }
            )
        return rows

    def has_tuned_lens(self, group: ModelGroup) -> bool:
        """Whether the group's tuned lens is loaded or saved where it is looked for."""
        return group.name in self._lenses or lens_saved(group)

    def _n_layers(self, group: ModelGroup) -> int | None:
        try:
            handle = self.manager.get(group.model)
        except Exception:  # a status listing never fails on one group
            return None
        layers = getattr(handle.config, "num_hidden_layers", None) or getattr(
            handle.config, "n_layer", None
        )
        return int(layers) if isinstance(layers, int) else None

    # -- using a group ---------------------------------------------------------------------
    def handle(self, group: ModelGroup) -> ModelHandle:
        """The group's model, loaded if needed and back on its device if it was cached."""
        handle = self.manager.get(group.model)
        with self._lock:
            if group.name in self._offloaded:
                with handle.lock:
                    _move(handle.model, handle.device)
                self._offloaded.discard(group.name)
        return handle

    def tuned_lens(self, group: ModelGroup) -> TunedLens:
        """The group's tuned lens, read once and kept."""
        with self._lock:
            lens = self._lenses.get(group.name)
        if lens is not None:
            return lens
        try:
            lens = TunedLens.load(group.tuned_lens_dir)
        except LensNotFoundError:
            # The sentence names no server path: anyone may read it.
            raise TunedLensMissingError(
                f"Model group {group.name!r} has no tuned lens yet (none is saved where the "
                "groups file's tuned_lens or TZOO_TUNED_LENS_DIR says); train one with "
                f"`tzoo lens train --model {group.model}`, or use the logit lens."
            ) from None
        with self._lock:
            return self._lenses.setdefault(group.name, lens)

    def switch(self, name: str) -> ModelGroup:
        """Make ``name`` the default group and load its model (and tuned lens, if any);
        the previous group goes to the CPU cache. Blocking: run it off the event loop."""
        group = self.resolve(name)
        handle = self.handle(group)
        if lens_saved(group):
            self.tuned_lens(group)
        with self._lock:
            previous, self.current = self.current, group.name
        if previous is not None and previous != group.name:
            self._offload(self.groups[previous], keep=handle)
        logger.info("Lens service switched to model group {}", group.name)
        return group

    def _offload(self, group: ModelGroup, *, keep: ModelHandle) -> None:
        """Move ``group``'s weights to host memory (on an accelerator; a CPU model stays
        where it is), unless another group uses the same model."""
        if not self.manager.is_loaded(group.model) or group.model == keep.name:
            return
        handle = self.manager.get(group.model)
        if handle.device == "cpu":
            return
        with handle.lock, self._lock:
            _move(handle.model, "cpu")
            self._offloaded.add(group.name)
        logger.info("Model group {} moved to the CPU cache", group.name)


def _move(model: torch.nn.Module, device: str) -> None:
    model.to(device)


def lens_saved(group: ModelGroup) -> bool:
    return (group.tuned_lens_dir / CONFIG_FILE).is_file()


def _read(path: Path, settings: Settings) -> tuple[dict[str, ModelGroup], str | None]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelGroupsFileError(f"The model groups file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelGroupsFileError(f"The model groups file {path} is not JSON: {exc}") from None
    try:
        parsed = _GroupsFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelGroupsFileError(
            f"The model groups file {path} is malformed: {problems}"
        ) from None
    groups: dict[str, ModelGroup] = {}
    for spec in parsed.groups:
        if spec.name in groups:
            raise ModelGroupsFileError(f"{path} names the group {spec.name!r} twice.")
        lens_dir = (
            (path.parent / spec.tuned_lens).resolve()
            if spec.tuned_lens
            else default_lens_dir(spec.model, settings)
        )
        groups[spec.name] = ModelGroup(
            spec.name, spec.model, spec.description, lens_dir, spec.verbalize_layer
        )
    if parsed.default_group is not None and parsed.default_group not in groups:
        raise ModelGroupsFileError(
            f"{path}: default_group {parsed.default_group!r} is not one of its groups."
        )
    return groups, parsed.default_group
