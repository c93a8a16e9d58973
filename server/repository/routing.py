"""Which READY version a request runs on, and the lease that keeps it there.

Shared by the process that owns the models (`lifecycle.ModelManager`) and by front-end
processes that follow the engine's (`frontend.EngineModels`): both keep one `ModelState` per
model and a `RepositorySnapshot`, and route the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import ModelNotFound, ModelNotReady
from . import folders
from .snapshot import RepositorySnapshot
from .versions import ModelState, ModelVersion, State

__all__ = ["Router"]


class Router:
    """Routing over `models`; subclasses keep `models` and `snapshot` current."""

    def __init__(self, default_model: str = "") -> None:
        self._default = default_model
        self.models: dict[str, ModelState] = {}
        self.snapshot = RepositorySnapshot(default_model=default_model)

    @property
    def connected(self) -> bool:
        """Whether the models' sessions can be reached: always, where they live in this
        process; a front end's only while its engine process is connected."""
        return True

    def default_model(self) -> str:
        """--default-model, else the first model (by name) with a READY version."""
        if self._default:
            return self._default
        ready = sorted(name for name, ms in self.models.items() if ms.ready())
        return ready[0] if ready else ""

    def resolve(self, model: str, version: int) -> ModelVersion:
        """The version a request names, or the highest READY one when it names none."""
        name = folders.check_name(model or self.snapshot.default_model or "<none>")
        ms = self.models.get(name)
        if ms is None or ms.removed:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        versions = ms.versions
        if version:
            mv = versions.get(version)
            if mv is None:
                raise ModelNotFound(f"model {name!r} has no version {version} being served")
            if mv.state is not State.READY:
                raise ModelNotReady(f"model {name!r} version {version} is {mv.state.name}: "
                                    f"{mv.reason}")
            return mv
        ready = ms.ready()
        if not ready:
            why = ms.error or "; ".join(
                f"version {mv.version} {mv.state.name}: {mv.reason}" for mv in versions.values()
            )
            raise ModelNotReady(f"model {name!r} has no ready version ({why})")
        return ready[-1]

    @contextlib.contextmanager
    def lease(self, model: str, version: int) -> Iterator[ModelVersion]:
        """A READY version for one request; it is not released before the request ends."""
        mv = self.resolve(model, version)
        mv.hold()
        try:
            yield mv
        finally:
            mv.release()
