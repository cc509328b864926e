"""Load the configured models in the background; /ready reports how far it got."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from loguru import logger

from tzoo.runtime.errors import ModelError
from tzoo.runtime.manager import ModelManager


@dataclass
class Preloader:
    manager: ModelManager
    names: list[str]
    states: dict[str, str] = field(default_factory=dict)  # pending | loading | ready | failed
    errors: dict[str, str] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.states = {name: "pending" for name in self.names}
        if self.names:
            self._thread = threading.Thread(target=self._run, name="tzoo-preload", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for name in self.names:
            self.states[name] = "loading"
            try:
                self.manager.get(name)
            except ModelError as exc:
                self.states[name] = "failed"
                self.errors[name] = exc.message
                logger.error("Preloading {} failed: {}", name, exc.message)
            except Exception as exc:  # keep the server up; /ready says what went wrong
                self.states[name] = "failed"
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                logger.opt(exception=exc).error("Preloading {} failed", name)
            else:
                self.states[name] = "ready"

    @property
    def ready(self) -> bool:
        return all(state == "ready" for state in self.states.values())

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
