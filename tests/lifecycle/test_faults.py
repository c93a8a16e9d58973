"""Faults around the repository: the server killed with SIGKILL in the middle of a swap comes
back serving the last good versions."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from swaplib import MODEL, PROBE, list_models, make_repository, publish, reference_vector, wait_for

if TYPE_CHECKING:
    from conftest import ServerProcess

READY = pb.VERSION_STATE_READY
UNAVAILABLE = pb.VERSION_STATE_UNAVAILABLE


def _embed(address: str) -> tuple[int, np.ndarray]:
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model=MODEL, texts=[PROBE]), timeout=30)
    return response.version, np.array(response.embeddings[0].values, np.float32)


def _restart(start_server: Callable[..., ServerProcess], repository: Path,
             dead: ServerProcess) -> ServerProcess:
    port = dead.address.rsplit(":", 1)[1]
    return start_server(repository, "--model-control-mode", "poll",
                        "--repository-poll-secs", "0.5", "--port", port, default_model=MODEL)


def test_sigkill_while_a_version_is_half_copied(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
) -> None:
    """An operator copies v2 in place (not the hidden-name-then-rename way) and the server is
    killed before the copy ends: on restart the half-written v2 is refused with a reason and
    v1 serves; when the copy completes, v2 is loaded and served."""
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    server = start_server(repository, "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.5", default_model=MODEL)
    source, target = staged / MODEL / "2", repository / MODEL / "2"
    target.mkdir()
    for item in source.iterdir():
        if item.name != "model.onnx":
            shutil.copy(item, target / item.name)
    onnx = (source / "model.onnx").read_bytes()
    (target / "model.onnx").write_bytes(onnx[: len(onnx) // 2])
    wait_for(lambda: (MODEL, 2) in list_models(server.address), 30, "v2 to be noticed")
    server.proc.kill()
    server.proc.wait(10)

    restarted = _restart(start_server, repository, server)
    version, vector = _embed(restarted.address)
    assert version == 1
    np.testing.assert_allclose(vector, reference_vector(staged / MODEL / "1"), atol=1e-5)
    state, reason = list_models(restarted.address)[(MODEL, 2)]
    assert state == UNAVAILABLE and reason, reason

    (target / "model.onnx").write_bytes(onnx)  # the copy completes
    wait_for(lambda: _embed(restarted.address)[0] == 2, 60, "v2 to serve")
    np.testing.assert_allclose(_embed(restarted.address)[1], reference_vector(source), atol=1e-5)
    assert restarted.stop() == 0
    assert "Traceback" not in "".join(restarted.lines)


def test_sigkill_right_after_a_version_is_published(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
) -> None:
    """v2 published the documented way and the server killed as soon as it notices it (while
    v2 loads and warms up, or just after): the restarted server serves v2, the last good
    version on disk."""
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    server = start_server(repository, "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.2", default_model=MODEL)
    publish(staged / MODEL / "2", repository / MODEL, 2)
    wait_for(lambda: (MODEL, 2) in list_models(server.address), 30, "v2 to be noticed")
    server.proc.kill()
    server.proc.wait(10)

    restarted = _restart(start_server, repository, server)
    assert list_models(restarted.address)[(MODEL, 2)][0] == READY
    version, vector = _embed(restarted.address)
    assert version == 2
    np.testing.assert_allclose(vector, reference_vector(staged / MODEL / "2"), atol=1e-5)
    assert restarted.stop() == 0
