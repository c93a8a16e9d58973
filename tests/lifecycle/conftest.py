"""Staged tiny versions for the lifecycle tests (helpers live in swaplib.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from swaplib import MODEL


@pytest.fixture(scope="session")
def staged(tmp_path_factory: pytest.TempPathFactory,
           make_tiny_options: Callable[..., Any]) -> Path:
    """A staging repository: `swap` versions 1 and 2 (different seeds, so different vectors),
    `news` version 1 (a classify model), each exported once."""
    from bertstream.export import export_model

    root = tmp_path_factory.mktemp("staged")
    export_model(make_tiny_options(MODEL, root, seed=0, version=1))
    export_model(make_tiny_options(MODEL, root, seed=1, version=2))
    export_model(make_tiny_options("news", root, labels=("positive", "negative"), version=1))
    return root
