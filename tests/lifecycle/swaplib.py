"""Helpers for version-swap tests: a publisher that renames versions into place the way
operators are told to, a load generator that records every answer, and ListModels polling."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from tokenizers import Tokenizer

MODEL = "swap"
PROBE = "今天股市大涨，沪指收复三千点"  # every load-generator request embeds this text


def reference_vector(version_dir: Path) -> np.ndarray:
    """What that version's graph gives for PROBE (mean of the last exported layer)."""
    session = ort.InferenceSession(str(version_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    ids = Tokenizer.from_file(str(version_dir / "tokenizer.json")).encode(PROBE).ids
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
             "token_type_ids": np.zeros((1, len(ids)), np.int64)}
    return session.run(["mean_layer2"], feeds)[0][0]


def publish(source: Path, model_dir: Path, version: int) -> Path:
    """The documented way: copy under a hidden name, then rename into place (atomic)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    hidden = model_dir / f".incoming-{version}"
    shutil.copytree(source, hidden)
    target = model_dir / str(version)
    os.rename(hidden, target)
    return target


def make_repository(staged: Path, root: Path, models: dict[str, list[int]]) -> Path:
    """A live repository with the given models and versions copied from the staging one."""
    for model, versions in models.items():
        (root / model).mkdir(parents=True)
        shutil.copy(staged / model / "config.pbtxt", root / model / "config.pbtxt")
        for version in versions:
            shutil.copytree(staged / model / str(version), root / model / str(version))
    return root


@dataclass
class Answer:
    at: float  # monotonic
    kind: str  # unary | stream
    version: int = 0
    vector: np.ndarray | None = None
    error: str = ""


@dataclass
class Load:
    """Unary and EmbedStream callers hammering one model until stopped; every answer kept."""

    address: str
    answers: list[Answer] = field(default_factory=list)
    # Opens each caller's channel (tests of front-end processes hand out channels that each
    # have a connection, and so a front end, of their own).
    connect: Callable[[str], grpc.Channel] = grpc.insecure_channel
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, unary: int = 2, streams: int = 2) -> Load:
        for i in range(unary):
            self._threads.append(threading.Thread(target=self._unary, name=f"unary-{i}"))
        for i in range(streams):
            self._threads.append(threading.Thread(target=self._stream, name=f"stream-{i}"))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.answers

    def _record(self, kind: str, response: pb.EmbedResponse | None, error: str = "") -> None:
        if response is not None and response.HasField("error"):
            error = f"{response.error.code}: {response.error.message}"
        vector = None
        if response is not None and response.embeddings:
            vector = np.array(response.embeddings[0].values, dtype=np.float32)
        version = response.version if response is not None else 0
        self.answers.append(Answer(time.monotonic(), kind, version, vector, error))

    def _unary(self) -> None:
        with self.connect(self.address) as channel:
            stub = pb_grpc.BertServiceStub(channel)
            while not self._stop.is_set():
                try:
                    response = stub.Embed(pb.EmbedRequest(model=MODEL, texts=[PROBE]), timeout=30)
                    self._record("unary", response)
                except grpc.RpcError as exc:
                    self._record("unary", None, f"{exc.code().name}: {exc.details()}")
                time.sleep(0.005)

    def _requests(self) -> Iterator[pb.EmbedRequest]:
        n = 0
        while not self._stop.is_set():
            n += 1
            yield pb.EmbedRequest(request_id=str(n), model=MODEL, texts=[PROBE])
            time.sleep(0.005)

    def _stream(self) -> None:
        with self.connect(self.address) as channel:
            stub = pb_grpc.BertServiceStub(channel)
            try:
                for response in stub.EmbedStream(self._requests(), timeout=600):
                    self._record("stream", response)
            except grpc.RpcError as exc:
                self._record("stream", None, f"{exc.code().name}: {exc.details()}")


def list_models(address: str) -> dict[tuple[str, int], tuple[int, str]]:
    """(model, version) -> (state, reason) from ListModels."""
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.BertServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    return {(m.model, m.version): (m.state, m.reason) for m in response.models}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
