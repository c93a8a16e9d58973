"""KServe v2 over HTTP (Triton's REST protocol), driven by the real tritonclient[http] with its
defaults (binary tensor data both ways), and by plain urllib for the JSON form and the errors.
Every answer must equal gRPC's for the same texts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
from rest.conftest import (  # noqa: E402
    HttpServer,
    cosine,
    grpc_classify,
    grpc_embed,
    start_http,
)
from tritonclient.utils import InferenceServerException  # noqa: E402

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["今天股市大涨，沪指收复三千点", "央行宣布降准", "苹果发布新款手机，售价5999元"]
INFERENCE_TOKEN = "kserve-inference-token-0123456789"
ADMIN_TOKEN = "kserve-admin-token-0123456789"
CLS = 3  # bertstream.v1 Pooling.POOLING_CLS


def client(server: HttpServer) -> Any:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")


@pytest.fixture(scope="module")
def triton(http_server: HttpServer) -> Iterator[Any]:
    with client(http_server) as triton:
        yield triton


def text_input(texts: list[str], shape: list[int] | None = None, binary: bool = True) -> Any:
    shape = shape or [len(texts)]
    tensor = httpclient.InferInput("TEXT", shape, "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], np.object_).reshape(shape),
                               binary_data=binary)
    return tensor


def call(url: str, body: bytes | dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET (no body) or POST, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data, headers or {},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def json_infer(texts: Any, shape: list[int], **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": shape, "data": texts}],
            **fields}


def test_health_and_server_metadata(triton: Any, http_server: HttpServer) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny-embed") and triton.is_model_ready("tiny-news", "1")
    assert not triton.is_model_ready("tiny-news", "7")
    assert not triton.is_model_ready("missing")
    meta = triton.get_server_metadata()
    assert meta["name"] == "bertstream" and meta["version"] == metadata.version("bertstream")
    assert "model_repository" in meta["extensions"]
    # Open routes say "not ready" alike for unknown and unready models (no name probing).
    missing = call(f"{http_server.url}/v2/models/missing/ready")
    unready = call(f"{http_server.url}/v2/models/tiny-news/versions/7/ready")
    assert missing[0] == unready[0] == 503
    assert json.loads(missing[2])["error"] == "model 'missing' is not ready"
    assert json.loads(unready[2])["error"] == "model 'tiny-news' is not ready"
    status, _, body = call(f"{http_server.url}/v2/models/tiny-embed/versions/x/ready")
    assert status == 400 and "version" in json.loads(body)["error"]
    status, _, body = call(f"{http_server.url}/v2/models/tiny-embed/versions/%C2%B2/ready")
    assert status == 400 and "version" in json.loads(body)["error"]  # '²' is a digit to str


def test_model_metadata(triton: Any) -> None:
    embed = triton.get_model_metadata("tiny-embed")
    assert embed == {"name": "tiny-embed", "versions": ["1"], "platform": "onnxruntime_onnx",
                     "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}],
                     "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}]}
    news = triton.get_model_metadata("tiny-news", "1")
    assert [(o["name"], o["datatype"], o["shape"]) for o in news["outputs"]] == [
        ("probabilities", "FP32", [-1, 3]), ("label", "BYTES", [-1]),
        ("embedding", "FP32", [-1, 64])]


def test_infer_embed_equals_grpc(triton: Any, http_server: HttpServer) -> None:
    result = triton.infer("tiny-embed", [text_input(TEXTS)], request_id="req-1")
    vectors = result.as_numpy("embedding")
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 64)
    assert cosine(vectors, grpc_embed(http_server.address, TEXTS)).min() >= 0.9999
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == (
        "req-1", "tiny-embed", "1")
    assert response["outputs"][0]["parameters"] == {"binary_data_size": len(TEXTS) * 64 * 4}
    cls = triton.infer("tiny-embed", [text_input(TEXTS)], model_version="1",
                       parameters={"normalize": True, "pooling": "cls", "pooling_layer": 1})
    expected = grpc_embed(http_server.address, TEXTS, pooling=CLS, pooling_layer=1,
                          normalize=True)
    np.testing.assert_allclose(cls.as_numpy("embedding"), expected, atol=1e-5)


def test_infer_classify_labels_equal_grpc(triton: Any, http_server: HttpServer) -> None:
    result = triton.infer("tiny-news", [text_input(TEXTS, [len(TEXTS), 1])])
    labels = [label.decode() for label in result.as_numpy("label")]
    assert labels == grpc_classify(http_server.address, TEXTS)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert result.as_numpy("embedding").shape == (len(TEXTS), 64)


def test_requested_outputs_mix_binary_and_json(triton: Any) -> None:
    outputs = [httpclient.InferRequestedOutput("label"),
               httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = triton.infer("tiny-news", [text_input(TEXTS, binary=False)], outputs=outputs)
    label, probabilities = result.get_response()["outputs"]
    assert (label["name"], probabilities["name"]) == ("label", "probabilities")
    assert "binary_data_size" in label["parameters"] and "data" not in label
    assert len(probabilities["data"]) == len(TEXTS) * 3 and "parameters" not in probabilities
    assert result.as_numpy("embedding") is None
    ranked = np.argmax(result.as_numpy("probabilities"), axis=1)
    names = [("positive", "neutral", "negative")[i] for i in ranked]
    assert [x.decode() for x in result.as_numpy("label")] == names


def test_json_infer_without_binary(http_server: HttpServer) -> None:
    """The protocol's plain JSON form: nested data for shape [N, 1], data back as JSON."""
    url = f"{http_server.url}/v2/models/tiny-embed/infer"
    status, headers, body = call(url, json_infer([[t] for t in TEXTS], [len(TEXTS), 1],
                                                 id="j", parameters={"normalize": True}))
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(body)
    [output] = reply["outputs"]
    assert (reply["id"], reply["model_name"], reply["model_version"]) == ("j", "tiny-embed", "1")
    assert (output["name"], output["datatype"], output["shape"]) == (
        "embedding", "FP32", [len(TEXTS), 64])
    vectors = np.array(output["data"], np.float32).reshape(len(TEXTS), 64)
    np.testing.assert_allclose(vectors, grpc_embed(http_server.address, TEXTS, normalize=True),
                               atol=1e-5)
    news = f"{http_server.url}/v2/models/tiny-news/versions/1/infer"
    status, _, body = call(news, json_infer(TEXTS, [len(TEXTS)],
                                            outputs=[{"name": "label"}]))
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == grpc_classify(http_server.address, TEXTS)


def test_binary_data_output_by_hand(http_server: HttpServer) -> None:
    """A binary request and `binary_data_output` without tritonclient: the layout itself."""
    raw = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in TEXTS)
    header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    status, headers, body = call(f"{http_server.url}/v2/models/tiny-embed/infer", header + raw,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    size = int(headers["inference-header-content-length"])
    [output] = json.loads(body[:size])["outputs"]
    assert output["parameters"] == {"binary_data_size": len(body) - size}
    vectors = np.frombuffer(body[size:], "<f4").reshape(output["shape"])
    assert cosine(vectors, grpc_embed(http_server.address, TEXTS)).min() >= 0.9999


BAD_HEADER = {"Inference-Header-Content-Length": "999999"}


@pytest.mark.parametrize(("path", "body", "headers", "status", "words"), [
    ("missing/infer", json_infer(["x"], [1]), None, 404, "missing"),
    ("tiny-embed/versions/abc/infer", json_infer(["x"], [1]), None, 400, "version"),
    ("tiny-embed/versions/9/infer", json_infer(["x"], [1]), None, 404, "9"),
    ("tiny-embed/infer", {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1],
                                      "data": ["x"]}]}, None, 400, "'TEXT'"),
    ("tiny-embed/infer", {"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1],
                                      "data": [1.0]}]}, None, 400, "BYTES"),
    ("tiny-embed/infer", b'{"inputs": [', None, 400, "JSON"),
    ("tiny-embed/infer", json_infer(["x"] * 257, [257]), None, 400, "limit of 256"),
    ("tiny-embed/infer", json_infer(["x", "y"], [3]), None, 400, "shape"),
    ("tiny-embed/infer", json_infer([1], [1]), None, 400, "strings"),
    ("tiny-embed/infer", json_infer(["很长" * 100], [1]), None, 400, "truncate"),
    ("tiny-embed/infer", json_infer(["x"], [1], parameters={"normalize": "yes"}), None, 400,
     "bool"),
    ("tiny-embed/infer", json_infer(["x"], [1], outputs=[{"name": "label"}]), None, 400,
     "label"),
    ("tiny-embed/infer", json_infer(["x"], [1]), BAD_HEADER, 400,
     "Inference-Header-Content-Length"),
    ("tiny-embed/infer", {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": 8}}]},
     None, 400, "binary_data_size"),
    ("tiny-embed/config", None, None, 501, "not supported"),
])
def test_errors(http_server: HttpServer, path: str, body: Any, headers: dict[str, str] | None,
                status: int, words: str) -> None:
    got, reply_headers, reply = call(f"{http_server.url}/v2/models/{path}", body, headers)
    assert got == status and reply_headers["content-type"] == "application/json"
    message = json.loads(reply)["error"]
    assert words in message and "Traceback" not in message


def test_errors_through_tritonclient(triton: Any) -> None:
    with pytest.raises(InferenceServerException) as missing:
        triton.infer("missing", [text_input(["x"])])
    assert missing.value.status() == "404" and "missing" in missing.value.message()
    with pytest.raises(InferenceServerException) as version:
        triton.get_model_metadata("tiny-embed", "abc")
    assert version.value.status() == "400" and "version" in version.value.message()


def test_repository_outside_explicit_mode(triton: Any) -> None:
    index = {(m["name"], m["version"], m["state"]) for m in triton.get_model_repository_index()}
    assert index == {("tiny-embed", "1", "READY"), ("tiny-news", "1", "READY")}
    for act in (triton.load_model, triton.unload_model):
        with pytest.raises(InferenceServerException) as refused:
            act("tiny-embed")
        assert refused.value.status() == "400"
        assert "needs a server started with --model-control-mode explicit" \
            in refused.value.message()


def test_repository_in_explicit_mode_with_tokens(
    model_repository: Path, start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"inference:{INFERENCE_TOKEN}\nadmin:{ADMIN_TOKEN}\n", encoding="utf-8")
    server = start_http(start_server, model_repository, "--model-control-mode", "explicit",
                        "--auth-token-file", str(tokens))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    inference = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}
    with client(server) as triton:
        assert triton.is_server_live() and triton.is_server_ready()  # probes need no token
        assert not triton.is_model_ready("tiny-news")
        for headers, status in ((None, "401"), (inference, "403")):
            for act in (triton.get_model_repository_index, lambda **kw: triton.load_model(
                    "tiny-news", **kw), lambda **kw: triton.unload_model("tiny-news", **kw)):
                with pytest.raises(InferenceServerException) as refused:
                    act(headers=headers)
                assert refused.value.status() == status, refused.value.message()
        rows = triton.get_model_repository_index(headers=admin)
        assert {(m["name"], m["state"]) for m in rows} == {
            ("tiny-embed", "UNAVAILABLE"), ("tiny-news", "UNAVAILABLE")}
        assert all("version" not in m for m in rows)
        triton.load_model("tiny-news", headers=admin)
        assert triton.is_model_ready("tiny-news")
        with pytest.raises(InferenceServerException) as keyless:
            triton.infer("tiny-news", [text_input(TEXTS[:1])])
        assert keyless.value.status() == "401"
        result = triton.infer("tiny-news", [text_input(TEXTS[:1])], headers=inference)
        assert result.as_numpy("probabilities").shape == (1, 3)
        rows = triton.get_model_repository_index(headers=admin)
        assert ("tiny-news", "1", "READY") in {(m["name"], m.get("version"), m["state"])
                                              for m in rows}
        triton.unload_model("tiny-news", headers=admin)
        assert not triton.is_model_ready("tiny-news")
        with pytest.raises(InferenceServerException) as unloaded:
            triton.infer("tiny-news", [text_input(TEXTS[:1])], headers=inference)
        assert unloaded.value.status() == "503"
        with pytest.raises(InferenceServerException) as missing:
            triton.load_model("missing", headers=admin)
        assert missing.value.status() == "404"
        with pytest.raises(InferenceServerException) as override:
            triton.load_model("tiny-embed", headers=admin, config='{"max_batch_size": 4}')
        assert override.value.status() == "501"
    assert server.process.stop() == 0
    log = "".join(server.process.lines)
    assert "Traceback" not in log and ADMIN_TOKEN not in log and INFERENCE_TOKEN not in log


def test_schedule_policy_over_http(triton: Any, http_server: HttpServer) -> None:
    """tritonclient.http's `priority` and `timeout`, and the same as plain JSON parameters;
    a level the model lacks is 400 with the reason."""
    assert "schedule_policy" in triton.get_server_metadata()["extensions"]
    result = triton.infer("tiny-embed", [text_input(TEXTS)], priority=1, timeout=5_000_000)
    assert result.as_numpy("embedding").shape == (len(TEXTS), 64)
    url = f"{http_server.url}/v2/models/tiny-embed/infer"
    status, _, body = call(url, json_infer(TEXTS, [len(TEXTS)], parameters={"priority": 2}))
    assert status == 200, body
    status, _, body = call(url, json_infer(TEXTS, [len(TEXTS)], parameters={"priority": 3}))
    assert status == 400 and b"priority 3 is outside 1..2" in body
