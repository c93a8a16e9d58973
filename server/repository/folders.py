"""The model repository on disk: names, scanning, and the version policy. Loads nothing.

A scan yields an immutable snapshot; the lifecycle decides what to load from it. Names that
come from disk or from the network pass `check_name` before they touch the filesystem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bertstream.v1.model_config_pb2 import ModelConfig, ModelVersionPolicy

from ..errors import InvalidInput
from ..version_format import parse_version
from . import config as config_mod

__all__ = ["ModelEntry", "check_name", "links_outside", "parse_version", "read_model", "scan",
           "scan_model", "select_versions"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_name(name: str) -> str:
    """Return `name` if it is a safe model name, else raise InvalidInput.

    Refuses path separators, `..`, absolute paths and hidden names (hidden folders are where
    operators stage copies before renaming them into place).
    """
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"invalid model name {name[:80]!r}: use letters, digits, '_', '-', '.', "
            "not starting with '.', no '..'"
        )
    return name


def select_versions(policy: ModelVersionPolicy, available: Iterable[int]) -> list[int]:
    """The versions a policy serves out of those on disk, ascending (Triton's semantics)."""
    versions = sorted(set(available))
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return versions
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in versions if v in wanted]
    count = policy.latest.num_versions if kind == "latest" else 1
    return versions[-max(count, 1):] if versions else []


@dataclass(frozen=True)
class ModelEntry:
    """One model folder as found on disk."""

    name: str
    path: Path
    config: ModelConfig | None
    config_error: str | None
    versions: dict[int, Path] = field(default_factory=dict)
    config_digest: str = ""  # sha256 of the config.pbtxt bytes that were parsed


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):  # outside, unreadable, or a symlink loop
        return False
    return True


def links_outside(root: Path, version_dir: Path) -> list[str]:
    """What in a version folder resolves outside the repository (symlinks, or the folder
    itself), relative to the folder; empty when nothing does.

    Triton follows such links; we refuse them, so a repository an operator audits is all that
    is served and a link cannot expose files elsewhere on the host."""
    if not _inside(version_dir, root):
        return ["the version folder itself"]
    escaping = []
    for folder, dirs, files in os.walk(version_dir):  # links to folders are listed, not walked
        for name in dirs + files:
            path = Path(folder, name)
            if not _inside(path, root):
                escaping.append(str(path.relative_to(version_dir)))
    return sorted(escaping)


def read_model(root: Path, model_dir: Path) -> ModelEntry:
    """One model folder: its config (or the reason it has none) and its version folders.
    Version folders that link outside the repository are listed: the lifecycle refuses them
    with a reason (`links_outside`) instead of leaving them out without a word."""
    if not _inside(model_dir, root):
        outside = "the folder links outside the repository"
        return ModelEntry(model_dir.name, model_dir, None, outside)
    versions = {
        v: child
        for child in model_dir.iterdir()
        if child.is_dir() and (v := parse_version(child.name)) is not None
    }
    digest = ""
    if not _inside(model_dir / config_mod.CONFIG_FILE, root):
        return ModelEntry(model_dir.name, model_dir, None,
                          f"{config_mod.CONFIG_FILE} links outside the repository", versions)
    try:
        (cfg, digest), err = config_mod.load_with_digest(model_dir), None
    except config_mod.ConfigError as exc:
        cfg, err = None, str(exc)
    return ModelEntry(model_dir.name, model_dir, cfg, err, versions, digest)


def scan_model(root: Path, name: str) -> ModelEntry | None:
    """The model called `name` (checked first), or None when its folder is not there."""
    model_dir = root / check_name(name)
    return read_model(root, model_dir) if model_dir.is_dir() else None


def scan(root: Path) -> dict[str, ModelEntry]:
    """Read every model folder under `root`; broken ones are kept with their error."""
    entries: dict[str, ModelEntry] = {}
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a folder")
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        try:
            check_name(model_dir.name)
        except InvalidInput:
            continue
        entries[model_dir.name] = read_model(root, model_dir)
    return entries
