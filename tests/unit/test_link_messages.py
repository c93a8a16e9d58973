"""Every message between front ends and the engine survives the link as the record it was."""

from __future__ import annotations

import asyncio
import typing

import numpy as np
import pytest
from bertstream.server.engine.costmodel import CostModel
from bertstream.server.processes import messages
from bertstream.server.processes.link import FrameLink, encode_frame
from bertstream.server.repository.snapshot import ModelRow, RepositorySnapshot, VersionRow
from bertstream.server.repository.versions import State

IDS = np.arange(12, dtype=np.int64)
SNAPSHOT = RepositorySnapshot(
    (ModelRow("news", "", (VersionRow("news", 1, State.READY, ""),)),), (), "news")
INFO = messages.VersionInfo(3, "news", 1, "/repo/news/1", b"\x08\x01", ("a", "b"), "CPU",
                            CostModel(0.001, 2e-6))
EXAMPLES: dict[type, tuple[object, ...]] = {
    messages.Hello: ("frontend-0",),
    messages.Submit: (7, 3, ("pooled_mean_l12",), True, IDS, [5, 7], [0, 5], None, 2,
                      "peer#1", 0.5),
    messages.Cancel: (7,),
    messages.Unpin: (3, 11),
    messages.Ack: (11,),
    messages.LoadModel: (8, "news"),
    messages.UnloadModel: (9, "news"),
    messages.Snapshot: (11, SNAPSHOT, [INFO]),
    messages.Result: (7, 0.01, 0.02, {"pooled_mean_l12": np.ones((2, 4), np.float32)}),
    messages.Error: (7, "ModelNotReady", "this model version is not loaded"),
    messages.Reply: (8, None),
}


def test_every_record_is_listed_once_and_has_an_example() -> None:
    records = {value for value in vars(messages).values()
               if isinstance(value, type) and issubclass(value, tuple) and value is not tuple}
    assert set(messages.MESSAGES) == records == set(EXAMPLES)
    assert len(messages.MESSAGES) == 11
    assert set(messages.FROM_ENGINE).isdisjoint(messages.FROM_FRONT_END)
    assert set(typing.get_args(messages.Message)) == set(messages.MESSAGES)


@pytest.mark.parametrize("kind", messages.MESSAGES, ids=lambda kind: kind.__name__)
def test_a_record_round_trips_through_a_frame(kind: type) -> None:
    sent = kind(*EXAMPLES[kind])
    got: list[object] = []

    async def go() -> None:
        link = FrameLink(got.append, print)
        link.data_received(b"".join(bytes(piece) for piece in encode_frame(sent)))

    asyncio.run(go())
    [received] = got
    assert type(received) is kind
    for field, want in zip(kind._fields, sent, strict=True):
        value = getattr(received, field)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(value, want)
        elif isinstance(want, dict):
            assert value.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(value[name], want[name])
        else:
            assert value == want
