"""An immutable picture of the repository for the protocol edges, and the one state mapping.

The manager publishes a new `RepositorySnapshot` after every change, on the event loop, by
replacing one reference; servicers and health read whichever snapshot is current, so they never
see a change half applied and never touch the manager's own state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bertstream.v1 import bertstream_pb2 as pb

from .versions import ModelState, State

__all__ = ["ModelRow", "RepositorySnapshot", "VersionRow", "build_snapshot", "wire_state"]

# bertstream's VersionState and KServe's (Triton's) state string, for each state.
_WIRE: dict[State, tuple[int, str]] = {
    State.UNKNOWN: (pb.VERSION_STATE_UNKNOWN, "UNKNOWN"),
    State.LOADING: (pb.VERSION_STATE_LOADING, "LOADING"),
    State.READY: (pb.VERSION_STATE_READY, "READY"),
    State.UNLOADING: (pb.VERSION_STATE_UNLOADING, "UNLOADING"),
    State.UNAVAILABLE: (pb.VERSION_STATE_UNAVAILABLE, "UNAVAILABLE"),
}


def wire_state(state: State) -> tuple[int, str]:
    """(bertstream.v1.VersionState, KServe state string): the one place states meet protos."""
    return _WIRE[state]


@dataclass(frozen=True)
class VersionRow:
    model: str
    version: int
    state: State
    reason: str


@dataclass(frozen=True)
class ModelRow:
    """One model: its model-level error ("" when none) and its version rows, ascending."""

    name: str
    error: str
    versions: tuple[VersionRow, ...]

    @property
    def ready(self) -> tuple[int, ...]:
        return tuple(r.version for r in self.versions if r.state is State.READY)


@dataclass(frozen=True)
class RepositorySnapshot:
    models: tuple[ModelRow, ...] = ()  # by name
    removed: tuple[str, ...] = ()  # models whose folder went away
    default_model: str = ""

    def model(self, name: str) -> ModelRow | None:
        return next((m for m in self.models if m.name == name), None)

    def ready_versions(self, name: str) -> tuple[int, ...]:
        row = self.model(name)
        return row.ready if row is not None else ()


def build_snapshot(models: Iterable[ModelState], default_model: str) -> RepositorySnapshot:
    """Copy the manager's per-model state into rows; `default_model` as the manager names it."""
    rows, removed = [], []
    for ms in sorted(models, key=lambda m: m.name):
        if ms.removed:
            removed.append(ms.name)
            continue
        rows.append(ModelRow(ms.name, ms.error, tuple(
            VersionRow(ms.name, v, mv.state, mv.reason) for v, mv in sorted(ms.versions.items())
        )))
    return RepositorySnapshot(tuple(rows), tuple(removed), default_model)
