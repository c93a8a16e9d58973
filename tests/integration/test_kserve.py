"""The KServe v2 / Triton gRPC protocol, driven by the real tritonclient[grpc] package.

This process imports tritonclient only, never bertstream.server.kserve or our
bertstream.kserve.v2 stubs: both register `inference.*` in protobuf's default descriptor pool.
"""

from __future__ import annotations

import queue
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from bertstream.client import BertClient  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

if TYPE_CHECKING:
    from conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PROTO = "bertstream/kserve/v2/grpc_service.proto"
TEXTS = ["今天股市大涨，沪指收复三千点", "央行宣布降准", "苹果发布新款手机，售价5999元"]


@pytest.fixture(scope="module")
def triton(address: str) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(url=address)
    yield client
    client.close()


def text_input(texts: list[str], shape: list[int] | None = None) -> Any:
    """What a tritonclient user sends: a BYTES tensor "TEXT" of UTF-8 strings."""
    shape = shape or [len(texts)]
    tensor = grpcclient.InferInput("TEXT", shape, "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], np.object_).reshape(shape))
    return tensor


def typed_input(name: str, datatype: str) -> Any:
    tensor = grpcclient.InferInput(name, [1], datatype)
    data = np.zeros(1, np.float32) if datatype == "FP32" else np.array([b"x"], np.object_)
    tensor.set_data_from_numpy(data)
    return tensor


def status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def _wire(message: Any) -> Any:
    """A message descriptor without json names, which never reach the wire."""
    copy = type(message).FromString(message.SerializeToString())
    for field in copy.field:
        field.ClearField("json_name")
    nested = [_wire(n) for n in copy.nested_type]
    del copy.nested_type[:]
    copy.nested_type.extend(nested)
    return copy


def test_proto_matches_tritonclient(tmp_path: Path) -> None:
    """Every message and rpc of our grpc_service.proto is Triton's, number for number."""
    out = tmp_path / "kserve.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"),
                    f"--descriptor_set_out={out}", PROTO], check=True)
    [ours] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    theirs = descriptor_pb2.FileDescriptorProto.FromString(service_pb2.DESCRIPTOR.serialized_pb)
    assert ours.package == theirs.package == "inference"
    triton_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert _wire(message) == _wire(triton_messages[message.name]), message.name
    [service], [triton_service] = ours.service, theirs.service
    assert service.name == triton_service.name == "GRPCInferenceService"
    triton_rpcs = {m.name: m for m in triton_service.method}
    for rpc in service.method:
        t = triton_rpcs[rpc.name]
        assert (rpc.input_type, rpc.output_type, rpc.client_streaming, rpc.server_streaming) \
            == (t.input_type, t.output_type, t.client_streaming, t.server_streaming), rpc.name


def test_server_app_imports_beside_tritonclient() -> None:
    """bertstream.server.app (parse_args, imported by other tests) must not load the KServe
    stubs at import time, or this process could not hold tritonclient too."""
    from bertstream.server import app

    assert callable(app.parse_args)
    assert "bertstream.kserve.v2.grpc_service_pb2" not in sys.modules


def test_health(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny-embed")
    assert triton.is_model_ready("tiny-news", "1")
    assert not triton.is_model_ready("tiny-news", "7")
    assert not triton.is_model_ready("missing")


def test_server_metadata(triton: Any) -> None:
    meta = triton.get_server_metadata()
    assert meta.name == "bertstream"
    assert meta.version == metadata.version("bertstream")
    assert "model_repository" in meta.extensions


def test_model_metadata(triton: Any) -> None:
    embed = triton.get_model_metadata("tiny-embed", as_json=True)
    assert embed["name"] == "tiny-embed" and embed["versions"] == ["1"]
    assert embed["platform"] == "onnxruntime_onnx"
    assert embed["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    assert embed["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "64"]}]
    news = triton.get_model_metadata("tiny-news", "1")
    assert [(o.name, o.datatype, list(o.shape)) for o in news.outputs] == [
        ("probabilities", "FP32", [-1, 3]), ("label", "BYTES", [-1]),
        ("embedding", "FP32", [-1, 64])]


def test_infer_embed_matches_bertclient(triton: Any, bc: BertClient) -> None:
    result = triton.infer("tiny-embed", [text_input(TEXTS)], request_id="req-1")
    vectors = result.as_numpy("embedding")
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(vectors, bc.encode(TEXTS), atol=1e-5)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == (
        "req-1", "tiny-embed", "1")


def test_infer_classify_matches_bertclient(triton: Any, address: str) -> None:
    result = triton.infer("tiny-news", [text_input(TEXTS, [len(TEXTS), 1])])
    probabilities = result.as_numpy("probabilities")
    labels = [label.decode() for label in result.as_numpy("label")]
    assert probabilities.shape == (len(TEXTS), 3)
    with BertClient(address, model="tiny-news") as news:
        ranked = news.classify(TEXTS)
        vectors = news.encode(TEXTS)
    for row, label, expected in zip(probabilities, labels, ranked, strict=True):
        by_index = sorted(expected, key=lambda x: x.index)
        np.testing.assert_allclose(row, [x.probability for x in by_index], atol=1e-5)
        assert label == expected[0].label
    np.testing.assert_allclose(result.as_numpy("embedding"), vectors, atol=1e-5)


def test_requested_outputs_and_parameters(triton: Any, bc: BertClient) -> None:
    result = triton.infer("tiny-news", [text_input(TEXTS)],
                          outputs=[grpcclient.InferRequestedOutput("label")])
    assert [o.name for o in result.get_response().outputs] == ["label"]
    assert result.as_numpy("probabilities") is None
    cls = triton.infer("tiny-embed", [text_input(TEXTS)],
                       parameters={"normalize": True, "pooling": "cls", "pooling_layer": 1})
    np.testing.assert_allclose(cls.as_numpy("embedding"),
                               bc.encode(TEXTS, pooling="cls", pooling_layer=1, normalize=True),
                               atol=1e-5)
    long = triton.infer("tiny-embed", [text_input(["很长" * 100])],
                        parameters={"truncate": True})
    assert long.as_numpy("embedding").shape == (1, 64)


def test_bytes_contents_input(address: str, bc: BertClient) -> None:
    """KServe clients other than tritonclient may send typed contents instead of raw bytes."""
    request = service_pb2.ModelInferRequest(model_name="tiny-embed", id="typed")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(TEXTS)])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
    [output] = response.outputs
    assert (response.id, output.name, output.datatype, list(output.shape)) == (
        "typed", "embedding", "FP32", [len(TEXTS), 64])
    vectors = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(len(TEXTS), 64)
    np.testing.assert_allclose(vectors, bc.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize(("raw", "words"), [
    (b"\x05\x00\x00\x00abc", "claims 5 bytes"),
    (b"\x01\x00", "4-byte length"),
    (b"\x02\x00\x00\x00\xff\xfe", "UTF-8"),
])
def test_malformed_raw_input(address: str, raw: bytes, words: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny-embed", raw_input_contents=[raw])
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(request, timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in exc.value.details()


def test_stream_answers_every_request_once(triton: Any, bc: BertClient) -> None:
    texts = TEXTS * 3
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, text in enumerate(texts):
            model = "tiny-embed" if i % 2 else "tiny-news"
            triton.async_stream_infer(model, [text_input([text])], request_id=f"r{i}")
        triton.async_stream_infer("missing", [text_input(["x"])], request_id="bad")
        got = [answers.get(timeout=60) for _ in range(len(texts) + 1)]
    finally:
        triton.stop_stream()
    assert answers.empty()
    results = [r.get_response() for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert sorted(r.id for r in results) == sorted(f"r{i}" for i in range(len(texts)))
    assert len(errors) == 1 and "missing" in errors[0].message()
    for r in (r for r, e in got if e is None):
        response = r.get_response()
        text = texts[int(response.id[1:])]
        name = "embedding" if response.model_name == "tiny-embed" else "probabilities"
        assert r.as_numpy(name).shape[0] == 1
        if name == "embedding":
            np.testing.assert_allclose(r.as_numpy(name), bc.encode([text]), atol=1e-5)


def test_repository_index(triton: Any) -> None:
    rows = {(m.name, m.version, m.state) for m in triton.get_model_repository_index().models}
    assert rows == {("tiny-embed", "1", "READY"), ("tiny-news", "1", "READY")}


@pytest.mark.parametrize(("call", "code", "words"), [
    (lambda t: t.infer("missing", [text_input(["x"])]), "NOT_FOUND", "missing"),
    (lambda t: t.get_model_metadata("missing"), "NOT_FOUND", "missing"),
    (lambda t: t.infer("tiny-embed", [text_input(["x"])], model_version="abc"),
     "INVALID_ARGUMENT", "version"),
    (lambda t: t.infer("tiny-embed", [typed_input("TEXT", "FP32")]), "INVALID_ARGUMENT",
     "BYTES"),
    (lambda t: t.infer("tiny-embed", [typed_input("INPUT0", "BYTES")]), "INVALID_ARGUMENT",
     "TEXT"),
    (lambda t: t.infer("tiny-embed", [text_input(["x"])],
                       outputs=[grpcclient.InferRequestedOutput("label")]),
     "INVALID_ARGUMENT", "label"),
    (lambda t: t.infer("tiny-embed", [text_input([" "])]), "INVALID_ARGUMENT", "empty"),
    (lambda t: t.infer("tiny-embed", [text_input(["x"])], parameters={"pooling": "sum"}),
     "INVALID_ARGUMENT", "pooling"),
    (lambda t: t.infer("tiny-embed", [text_input(["很长" * 100])]), "INVALID_ARGUMENT",
     "truncate"),
    (lambda t: t.infer("tiny-embed", [text_input(["x"])], parameters={"normalize": "yes"}),
     "INVALID_ARGUMENT", "bool"),
    (lambda t: t.get_model_config("tiny-embed"), "UNIMPLEMENTED", ""),
    (lambda t: t.load_model("tiny-embed"), "FAILED_PRECONDITION", "explicit"),
    (lambda t: t.unload_model("tiny-embed"), "FAILED_PRECONDITION", "explicit"),
])
def test_errors(triton: Any, call: Callable[[Any], Any], code: str, words: str) -> None:
    with pytest.raises(InferenceServerException) as exc:
        call(triton)
    assert status(exc) == f"StatusCode.{code}"
    assert words in exc.value.message()
    assert "Traceback" not in exc.value.message()


def test_reflection_lists_the_kserve_service(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert "inference.GRPCInferenceService" in names


def test_load_and_unload_in_explicit_mode(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(model_repository, "--model-control-mode", "explicit")
    client = grpcclient.InferenceServerClient(url=proc.address)
    try:
        index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
        assert index == {("tiny-embed", "", "UNAVAILABLE"), ("tiny-news", "", "UNAVAILABLE")}
        assert not client.is_model_ready("tiny-news")
        client.load_model("tiny-news")
        assert client.is_model_ready("tiny-news")
        result = client.infer("tiny-news", [text_input(TEXTS[:1])])
        assert result.as_numpy("probabilities").shape == (1, 3)
        rows = [(m.name, m.version, m.state) for m in client.get_model_repository_index().models]
        assert rows == [("tiny-embed", "", "UNAVAILABLE"), ("tiny-news", "1", "READY")]
        client.unload_model("tiny-news")
        assert not client.is_model_ready("tiny-news")
        with pytest.raises(InferenceServerException) as exc:
            client.infer("tiny-news", [text_input(TEXTS[:1])])
        assert status(exc) == "StatusCode.UNAVAILABLE"
        with pytest.raises(InferenceServerException) as exc:
            client.load_model("missing")
        assert status(exc) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as exc:
            client.load_model("tiny-embed", config='{"max_batch_size": 4}')
        assert status(exc) == "StatusCode.UNIMPLEMENTED"
    finally:
        client.close()
    assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines[-40:])


def test_triton_schedule_policy_priority_and_timeout(triton: Any) -> None:
    """tritonclient's `infer(priority=, timeout=)` (uint64 and int64 parameters) reach the
    scheduler; a level the model lacks is INVALID_ARGUMENT; the extension is listed."""
    assert "schedule_policy" in triton.get_server_metadata().extensions
    for priority in (1, 2):
        result = triton.infer("tiny-embed", [text_input(["今天股市大涨"])], priority=priority,
                              timeout=5_000_000)
        assert result.as_numpy("embedding").shape == (1, 64)
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("tiny-embed", [text_input(["今天股市大涨"])], priority=7)
    assert "INVALID_ARGUMENT" in status(exc) and "priority 7 is outside 1..2" in str(exc.value)
