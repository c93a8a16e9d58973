"""The second CPU engine (server/engine/backends/openvino.py) behind a real server: the same answers
as onnxruntime's through every kind of call, the engine and precision shown, bad options
refused with the reason, and bf16 falling back to f32 when its check fails."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from bertstream.v1.model_config_pb2 import Pooling

pytest.importorskip("openvino")

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["央行宣布降准", "今天股市大涨，沪指收复三千点", "暴雨救援",
         "苹果发布iPhone 15，售价5999元"]


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.stack([np.frombuffer(e.raw, "<f4") for e in response.embeddings])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openvino_answers_as_onnxruntime_does(
    model_repository: Path, start_server: Callable[..., ServerProcess],
    stub: pb_grpc.BertServiceStub,
) -> None:
    server = start_server(model_repository, "--cpu-engine", "openvino")
    with grpc.insecure_channel(server.address) as channel:
        ov = pb_grpc.BertServiceStub(channel)
        info = ov.GetModel(pb.GetModelRequest(model="tiny-news"), timeout=10)
        assert info.execution_provider.startswith("OpenVINO CPU ")
        assert len(info.batch_cost.points) >= 3  # the cost model measured on OpenVINO
        for pooling in (Pooling.POOLING_MEAN, Pooling.POOLING_CLS, Pooling.POOLING_MEAN_MAX):
            request = pb.EmbedRequest(model="tiny-embed", texts=TEXTS, pooling=pooling,
                                      raw_values=True)
            got, want = ov.Embed(request, timeout=30), stub.Embed(request, timeout=30)
            assert _cosines(_vectors(got), _vectors(want)).min() >= 0.999
        tokens = pb.EmbedRequest(model="tiny-embed", texts=TEXTS[:1],
                                 pooling=Pooling.POOLING_TOKENS)
        got_tokens = ov.Embed(tokens, timeout=30).embeddings[0]
        assert list(got_tokens.shape) == list(stub.Embed(tokens, timeout=30).embeddings[0].shape)
        classify = pb.ClassifyRequest(model="tiny-news", texts=TEXTS, top_k=1)
        got_labels = [r.labels[0].label for r in ov.Classify(classify, timeout=30).results]
        want_labels = [r.labels[0].label for r in stub.Classify(classify, timeout=30).results]
        assert got_labels == want_labels
        stream = [pb.EmbedRequest(model="tiny-embed", request_id=str(i), texts=[t],
                                  raw_values=True) for i, t in enumerate(TEXTS)]
        answers = list(ov.EmbedStream(iter(stream), timeout=30))
        assert [a.request_id for a in answers] == [str(i) for i in range(len(TEXTS))]
    assert server.stop() == 0


def test_a_config_may_name_the_engine_and_bad_options_are_refused(
    model_repository: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
) -> None:
    repository = tmp_path / "repo"
    for name, extra in (("tiny-embed", 'backend: "openvino"\nparameters { key: '
                         '"INFERENCE_PRECISION_HINT" value { string_value: "f32" } }\n'),
                        ("tiny-news", 'backend: "openvino"\nparameters { key: "NUM_STREAMS" '
                         'value { string_value: "many" } }\n')):
        shutil.copytree(model_repository / name, repository / name)
        config = repository / name / "config.pbtxt"
        config.write_text(config.read_text("utf-8") + extra, "utf-8")
    server = start_server(repository)  # the server's own default engine: onnxruntime
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(model="tiny-embed"), timeout=10)
        assert info.execution_provider == "OpenVINO CPU f32"
        rows = {(m.model, m.version): m for m in stub.ListModels(pb.ListModelsRequest(),
                                                                 timeout=10).models}
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb.EmbedRequest(model="tiny-news", texts=["a"]), timeout=10)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    log = "".join(server.lines)
    assert "parameter NUM_STREAMS must be a positive integer, got 'many'" in log
    assert ("tiny-embed", 1) in rows


def test_bf16_that_fails_its_check_serves_f32_and_says_why(
    model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process: a check no bf16 can pass (cosine above 1) makes the version f32."""
    from bertstream.server.engine.backends import openvino
    from bertstream.server.engine.loader import _check_batch
    from bertstream.server.engine.tokenizer import TextTokenizer

    folder = model_dir("tiny-news")
    check = _check_batch(TextTokenizer(folder / "tokenizer.json", 64))
    native = openvino.OpenVinoPool(folder / "model.onnx", {}, 1, check)
    if native.precision != "bf16":
        pytest.skip(f"this CPU serves f32 only: {native.provider}")
    monkeypatch.setattr(openvino, "MIN_COSINE", 1.01)
    pool = openvino.OpenVinoPool(folder / "model.onnx", {}, 1, check)
    assert pool.precision == "f32"
    assert pool.provider.startswith("OpenVINO CPU f32 (bf16 failed: ")
    assert "to f32 (< 1.01)" in pool.provider
