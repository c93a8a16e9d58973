"""What a bulk feed is asked to do (FeedOptions), what it did (FeedReport), and the one error
that stops it (FeedError): the types every feed_* module shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .channels import TlsFiles
from .messages import schedule

__all__ = ["DEFAULT_STREAMS", "FeedError", "FeedOptions", "FeedReport"]

DEFAULT_STREAMS = 4


class FeedError(Exception):
    """The feed cannot go on (bad input file, fatal server answer, no progress)."""


@dataclass(frozen=True)
class FeedOptions:
    input: Path
    output: Path
    task: str = "embed"  # embed | classify
    servers: tuple[str, ...] = ("localhost:8001",)
    model: str = ""
    version: int = 0
    # pooling, normalize, top_k, priority, timeout_us, ...: every message carries them. No
    # priority (0): the server puts stream messages in the model's default level, the lowest.
    request: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32  # texts per stream message
    window: int = 4  # messages in flight per stream
    streams: int = 0  # 0: one per server address, at least DEFAULT_STREAMS
    rotate_after: int = 64  # messages per stream before it is reopened (rebalancing)
    id_field: str = "id"
    text_field: str = "text"
    give_up_s: float = 300.0  # no answer at all for this long: stop (a rerun resumes)
    progress: bool = True
    tls: TlsFiles | None = None  # None: plaintext
    server_name: str | None = None  # the name in the server's certificate, when not dialled
    token: str | None = None  # bearer token (server/api/security.py)

    def __post_init__(self) -> None:
        if self.task not in ("embed", "classify"):
            raise ValueError(f"task must be embed or classify, not {self.task!r}")
        for name in ("batch_size", "window", "rotate_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.streams < 0:
            raise ValueError("streams must be >= 0 (0: the default)")
        if self.give_up_s <= 0:
            raise ValueError("give_up_s must be > 0")
        schedule(self.request.get("priority", 0), self.request.get("timeout_us", 0))


@dataclass
class FeedReport:
    items: int = 0  # ids in the input
    already_done: int = 0  # skipped: answered by an earlier run
    answered: int = 0  # lines written by this run
    errors: int = 0  # of which error lines
    stream_retries: int = 0  # streams reopened after a failure
    duplicates_dropped: int = 0  # answers that arrived for an id already written
    seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0
