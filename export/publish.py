"""The repository writer: a version folder appears whole or not at all.

A serving repository is scanned while we write to it, and a half-written folder must never be
served. Everything is built in a hidden temp folder inside the model folder (same filesystem,
and hidden names are skipped by the scanner), verified there, and only then renamed to its
version number: `rename(2)` is atomic, and it fails rather than replace a non-empty folder, so
two exporters racing for one version cannot both win. On any failure the temp folder (and a
config.pbtxt this run wrote for a new model) is removed and nothing is published.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bertstream.server import version_format
from bertstream.server.errors import InvalidInput
from bertstream.server.repository import folders
from bertstream.v1 import model_config_pb2 as pb

from .model_config import CONFIG_FILE, check_compatible, write_model_config

TEMP_PREFIX = ".tmp-"


class PublishError(RuntimeError):
    """The version cannot be published (bad name, existing version, ...)."""


class VersionExistsError(PublishError):
    pass


def validate_model_name(name: str) -> str:
    """The server's naming rule (`folders.check_name`), raised as a PublishError."""
    try:
        return folders.check_name(name)
    except InvalidInput as exc:
        raise PublishError(str(exc)) from None


def existing_versions(model_dir: Path) -> list[int]:
    """Version folders as the server counts them: canonical positive integers only."""
    if not model_dir.is_dir():
        return []
    return sorted(
        version
        for entry in model_dir.iterdir()
        if entry.is_dir() and (version := version_format.parse_version(entry.name)) is not None
    )


def next_version(model_dir: Path) -> int:
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


@dataclass(frozen=True)
class VersionPlan:
    model_dir: Path
    version: int

    @property
    def target(self) -> Path:
        return self.model_dir / str(self.version)


def plan_version(repository: Path, model: str, version: int | None = None) -> VersionPlan:
    """Where the version will go; fails fast (before any export work) on a bad name or an
    existing version."""
    model_dir = Path(repository) / validate_model_name(model)
    if version is None:
        version = next_version(model_dir)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PublishError(f"version must be a positive integer, not {version!r}")
    plan = VersionPlan(model_dir, version)
    if plan.target.exists():
        raise VersionExistsError(f"{plan.target} already exists; versions are never overwritten")
    return plan


def _rename_into_place(temp: Path, target: Path) -> None:
    if target.exists():
        raise VersionExistsError(f"{target} appeared while exporting; not overwriting it")
    try:
        os.rename(temp, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise VersionExistsError(f"{target} appeared while exporting") from error
        raise


def publish_version(
    plan: VersionPlan,
    build: Callable[[Path], None],
    config: pb.ModelConfig | None = None,
    max_positions: int | None = None,
) -> Path:
    """Run `build(temp_folder)`, then publish it as `plan.target`.

    `build` writes the files and verifies them; raising aborts the publish. `config` is written
    as the model's config.pbtxt when the model has none, and otherwise must agree with it.
    """
    if config is not None:
        new_model = check_compatible(plan.model_dir, config, max_positions or 1 << 30)
    else:
        new_model = False
    created_model_dir = not plan.model_dir.exists()
    plan.model_dir.mkdir(parents=True, exist_ok=True)
    temp = plan.model_dir / f"{TEMP_PREFIX}{plan.version}-{secrets.token_hex(4)}"
    temp.mkdir()  # not mkdtemp: that makes it 0700, unreadable to a server run as another user
    wrote_config = False
    try:
        build(temp)
        if config is not None and new_model and not (plan.model_dir / CONFIG_FILE).exists():
            write_model_config(plan.model_dir, config)
            wrote_config = True
        _rename_into_place(temp, plan.target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if wrote_config:
            (plan.model_dir / CONFIG_FILE).unlink(missing_ok=True)
        if created_model_dir and not any(plan.model_dir.iterdir()):
            plan.model_dir.rmdir()
        raise
    return plan.target
