"""A real bertstream-server process on a free loopback port, over the session's repository."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from bertstream.client import BertClient
from bertstream.v1 import bertstream_pb2_grpc
from tokenizers import Tokenizer

READY_LINE = "bertstream serving on "


class ServerProcess:
    def __init__(self, repository: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "bertstream.server", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--default-model", "tiny-embed", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: list[str] = []
        self.address = self._wait_ready(timeout=180)
        # Keep draining the log so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith(READY_LINE):
                    return line[len(READY_LINE):].strip()
        finally:
            timer.cancel()
        raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


@pytest.fixture(scope="session")
def server(model_repository: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(model_repository)
    yield proc
    code = proc.stop()
    assert code == 0, "".join(proc.lines[-40:])
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)


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
