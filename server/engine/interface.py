"""What the model manager asks of an engine: a `Loader` turns a version folder into a `Loaded`
version (tokenizer, batcher over a backend, labels) and lets it go again.

The manager (repository/manager.py) knows only this module of the engine, so it runs with a
fake loader in tests and with any engine in production; engine/loader.py is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bertstream.v1.model_config_pb2 import ModelConfig

if TYPE_CHECKING:
    from .batcher import Batcher
    from .costmodel import CostModel
    from .tokenizer import TextTokenizer

__all__ = ["Loaded", "Loader"]


@dataclass
class Loaded:
    """What a READY version serves with (built by a `Loader`)."""

    config: ModelConfig
    tokenizer: TextTokenizer | Any  # Any: fake loaders in tests need not build one
    batcher: Batcher | Any
    labels: list[str]
    provider: str
    busy_seconds: Callable[[], float] = lambda: 0.0  # device time, for the metrics
    cost: CostModel | None = None  # once the warm-up measured it


class Loader(Protocol):
    """Turns a version folder into something that serves, and lets it go again."""

    async def build(self, model: str, version: int, path: Path,
                    config: ModelConfig) -> Loaded:
        """Files, session, tokenizer, labels, output checks; raises with a reason."""
        ...

    async def warm_up(self, loaded: Loaded) -> None:
        """Real requests through it before it turns READY; raises with a reason."""
        ...

    async def release(self, loaded: Loaded, trim: bool) -> None:
        """Stop it and drop its session; `trim`: also hand freed memory back to the OS."""
        ...
