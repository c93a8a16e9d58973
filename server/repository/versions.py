"""A model version's state machine, what a READY version serves with, and one model's state.

Contract: every state change goes through `ModelVersion.transition`, checked against
`TRANSITIONS` (Triton's state names, so the repository index reads like Triton's). A `ModelState`
is owned by the `ModelManager` and changed only on the event loop by a holder of its `lock`;
`lease` counts (`ModelVersion.leases`) change on the event loop without the lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.interface import Loaded
from . import watcher

__all__ = ["TRANSITIONS", "ConfigState", "ModelState", "ModelVersion", "State"]

log = logging.getLogger("bertstream.server.lifecycle")


class State(enum.Enum):
    UNKNOWN = 0
    LOADING = 1
    READY = 2
    UNLOADING = 3
    UNAVAILABLE = 4


TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNKNOWN: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.READY, State.UNAVAILABLE}),
    State.READY: frozenset({State.UNLOADING}),
    State.UNLOADING: frozenset({State.UNAVAILABLE}),
    State.UNAVAILABLE: frozenset({State.LOADING}),
}


@dataclass(eq=False)
class ModelVersion:
    model: str
    version: int
    path: Path
    state: State = State.UNKNOWN
    reason: str = ""
    loaded: Loaded | None = None
    leases: int = 0
    config_digest: str = ""  # of the config.pbtxt this version was loaded with
    failed: watcher.Fingerprint | None = None  # the folder as it was when its load failed
    # Names this object (not its version number: a reload loads the same number again) to
    # front-end processes (processes/engine_process.py).
    uid: int = field(default_factory=itertools.count(1).__next__)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def transition(self, new: State, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.model}/{self.version}: {self.state.name} -> {new.name}")
        log.info("%s version %d: %s -> %s %s", self.model, self.version, self.state.name,
                 new.name, reason)
        self.state, self.reason = new, reason

    def hold(self) -> None:
        """One more request (or front-end process) using this version's session."""
        self.leases += 1
        self._idle.clear()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no request (or front-end process) holds this version."""
        if self.leases:
            await self._idle.wait()


@dataclass(frozen=True)
class ConfigState:
    """Where one model's config.pbtxt stands, as one value: the manager replaces it whole at
    each step of a sync, so no reader sees half of a change (a failed reload's error without
    the attempt that is not to be retried)."""

    digest: str = ""  # the config.pbtxt its serving versions use ("": none serves yet)
    error: str = ""  # model-level: config broken, not applied, unloaded ("" when none)
    # A config change whose reload failed, as (digest, folders): tried again only when the
    # config or a version folder changes, not on every poll.
    failed_reload: tuple[str, tuple[object, ...]] | None = None
    removed: bool = False  # its folder went away (health: NOT_SERVING)

    def unreadable(self, error: str) -> ConfigState:
        """config.pbtxt cannot be read: the versions serving keep the config they have."""
        return dataclasses.replace(self, error=error, removed=False)

    def reload_failed(self, attempt: tuple[str, tuple[object, ...]],
                      error: str) -> ConfigState:
        """The old config keeps serving; `attempt` is not retried until it changes."""
        return ConfigState(self.digest, error, attempt)

    def unloaded(self) -> ConfigState:
        return dataclasses.replace(self, error="unloaded by UnloadModel")


@dataclass(eq=False)
class ModelState:
    """Everything the manager knows about one model. Its own lock: work on one model never
    waits for another model's load."""

    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    config: ConfigState = field(default_factory=ConfigState)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def error(self) -> str:
        return self.config.error

    @property
    def removed(self) -> bool:
        return self.config.removed

    def ready(self) -> list[ModelVersion]:
        """READY versions, ascending."""
        return [mv for _, mv in sorted(self.versions.items()) if mv.state is State.READY]
