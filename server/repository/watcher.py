"""When is a version folder on disk ready to load? Fingerprints, completeness and stability.

Operators are told to copy a version under a hidden name and rename it into place (atomic);
this module is the safety net for those who copy straight into `3/`: a folder is loaded only
when its required files are present and its fingerprint (every file's name, size, mtime and
ctime, which no copy tool preserves) has stopped changing: two looks at least `quiet_s` apart
agree, or the newest file already landed `quiet_s` before the first look (a renamed, finished
folder). A folder that changes after a failed load is tried again; one that does not is not.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from bertstream.v1.model_config_pb2 import ModelConfig

from ..version_format import IR_FILE, IR_WEIGHTS_FILE, required_files

__all__ = ["Fingerprint", "StabilityTracker", "fingerprint", "missing_files"]

# (relative path, size, mtime_ns, ctime_ns), sorted. ctime too: `cp -p` and rsync keep a
# source's old mtime, but nothing can set ctime, so it tells when the file really landed.
Fingerprint = tuple[tuple[str, int, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """Every regular file under `folder` (hidden ones too: a copy in progress may use them)."""
    entries = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            try:
                stat = path.stat()
            except OSError:  # removed between listing and stat: the folder is changing
                continue
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns,
                            stat.st_ctime_ns))
    return tuple(sorted(entries))


def missing_files(folder: Path, config: ModelConfig) -> list[str]:
    """Files a version of this model cannot load without; an OpenVINO IR's model.xml that has
    arrived without its model.bin (a copy still landing) waits for it too."""
    missing = [name for name in required_files(config) if not (folder / name).is_file()]
    if (folder / IR_FILE).is_file() and not (folder / IR_WEIGHTS_FILE).is_file():
        missing.append(IR_WEIGHTS_FILE)
    return missing


@dataclass
class _Seen:
    fingerprint: Fingerprint
    since: float  # monotonic time the fingerprint was first seen


class StabilityTracker:
    """Remembers each folder's fingerprint between polls."""

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        self._seen: dict[Path, _Seen] = {}

    def stable(self, folder: Path, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        current = fingerprint(folder)
        seen = self._seen.get(folder)
        if seen is None or seen.fingerprint != current:
            self._seen[folder] = _Seen(current, now)
            newest = max((max(entry[2:]) for entry in current), default=0)
            age = time.time() - newest / 1e9
            return bool(current) and age >= self.quiet_s
        return now - seen.since >= self.quiet_s

    def forget(self, keep: set[Path]) -> None:
        """Drop folders that are gone, so the table does not grow with every rename."""
        for folder in [f for f in self._seen if f not in keep]:
            del self._seen[folder]
