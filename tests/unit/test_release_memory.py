"""The server freezes start-up objects out of the garbage collector; releasing a model version
must still collect what was frozen and has become garbage since (a version loaded at start)."""

from __future__ import annotations

import gc
import weakref

from bertstream.server.engine.loader import _release_memory


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


def test_release_collects_frozen_cycles_and_freezes_again() -> None:
    first, second = Node(), Node()
    first.peer, second.peer = second, first  # a cycle: only the collector frees it
    alive = weakref.ref(first)
    gc.collect()
    gc.freeze()
    try:
        del first, second
        gc.collect()
        assert alive() is not None, "frozen objects are out of the collector's reach"
        _release_memory()
        assert alive() is None
        assert gc.get_freeze_count() > 0, "what is still alive is frozen again"
    finally:
        gc.unfreeze()
