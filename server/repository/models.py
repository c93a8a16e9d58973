"""The models interface: what every front end (gRPC, KServe, HTTP) and the pipeline serve from.

Two implementations: `manager.ModelManager` (the models of this process: it loads them) and
`processes.frontend_process.EngineModels` (a front-end process's view of the engine process's
models). Both route the same way (routing.Router). The form follows Triton's
model_lifecycle.h: a small interface, one contract line per member.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from .snapshot import RepositorySnapshot
from .versions import ModelVersion

__all__ = ["Models"]


class Models(Protocol):
    # The repository folder (KServe's RepositoryIndex also lists what is on disk, unloaded).
    root: Path
    # What callers may see, replaced whole on every change: models, versions, states, reasons.
    snapshot: RepositorySnapshot

    @property
    def connected(self) -> bool:
        """Whether the versions' sessions can be reached now (a front end's engine may not)."""
        ...

    def resolve(self, model: str, version: int) -> ModelVersion:
        """The READY version a request names (model "": the default; version 0: the highest
        READY one); raises ModelNotFound or ModelNotReady with the reason."""
        ...

    def lease(self, model: str, version: int) -> AbstractContextManager[ModelVersion]:
        """`resolve`, held for one request: the version's session outlives the request even
        when a swap retires it meanwhile."""
        ...

    async def load_model(self, name: str) -> ModelVersion:
        """Load or reload one model from the repository (explicit control); returns its
        highest READY version once every front end routes by the result."""
        ...

    async def unload_model(self, name: str) -> None:
        """Stop serving one model; requests already leased finish on it."""
        ...
