"""A real bertstream-server process on a free loopback port, over the session's repository."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from bertstream.client import BertClient
from bertstream.v1 import bertstream_pb2_grpc
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from conftest import ServerProcess


# Every test on the shared server runs on both CPU engines.
@pytest.fixture(scope="session", params=["onnxruntime", "openvino"])
def server(
    request: pytest.FixtureRequest, model_repository: Path,
    start_server: Callable[..., ServerProcess],
) -> Iterator[ServerProcess]:
    repository = model_repository
    if request.param == "openvino":
        repository = request.getfixturevalue("openvino_model_repository")
    proc = start_server(repository)
    proc.engine = request.param
    yield proc
    code = proc.stop()
    assert code == 0, "".join(proc.lines[-40:])
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)


@pytest.fixture(scope="session")
def engine(server: ServerProcess) -> str:
    """The CPU engine the shared server runs its models on."""
    return server.engine


@pytest.fixture(scope="session")
def address(server: ServerProcess) -> str:
    return server.address


@pytest.fixture(scope="session")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> bertstream_pb2_grpc.BertServiceStub:
    return bertstream_pb2_grpc.BertServiceStub(channel)


@pytest.fixture(scope="session")
def bc(address: str) -> Iterator[BertClient]:
    with BertClient(address, model="tiny-embed") as client:
        yield client


class Reference:
    """onnxruntime run directly on one model version, one text at a time (no padding)."""

    def __init__(self, version_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    def run(self, text: str, output: str) -> np.ndarray:
        enc = self.tokenizer.encode(text)
        feeds = {
            "input_ids": np.asarray([enc.ids], np.int64),
            "attention_mask": np.asarray([enc.attention_mask], np.int64),
            "token_type_ids": np.asarray([enc.type_ids], np.int64),
        }
        return self.session.run([output], feeds)[0][0]


@pytest.fixture(scope="session")
def reference(model_repository: Path) -> dict[str, Reference]:
    return {name: Reference(model_repository / name / "1") for name in ("tiny-embed", "tiny-news")}
