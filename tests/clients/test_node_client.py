"""The Node.js example client (client/examples/node) against a real server: its vectors,
labels and errors must match the Python client's for the same texts.

Skipped only where `node` or `npm` is missing, or where `npm ci` cannot reach the registry.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from bertstream.client import BertClient
from bertstream.v1 import bertstream_pb2 as pb
from nodelib import NODE_DIR, Result, node_with_modules, run_cli

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = [
    "今天股市大涨，沪指收复三千点",
    "央行宣布降准，股市应声大涨",
    "苹果发布iPhone 15，售价5999元",
    "颱風來襲，學校停課一天",
    "教育部发布高考报名通知",
]


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` executable, with the pinned modules installed (`npm ci`) when missing."""
    return node_with_modules("Node.js client test")


@pytest.fixture(scope="session")
def node_cli(node: str) -> Callable[..., Result]:
    """`node_cli(*args)`: runs cli.js."""

    def run(*args: str) -> Result:
        return run_cli(node, *args)

    return run


@pytest.fixture(scope="module")
def address(model_repository: Path,
            start_server: Callable[..., ServerProcess]) -> Iterator[str]:
    proc = start_server(model_repository)
    yield proc.address
    assert proc.stop() == 0, "".join(proc.lines[-40:])


@pytest.fixture(scope="module")
def py_embed(address: str) -> Iterator[BertClient]:
    with BertClient(address, model="tiny-embed") as client:
        yield client


@pytest.fixture(scope="module")
def py_news(address: str) -> Iterator[BertClient]:
    with BertClient(address, model="tiny-news") as client:
        yield client


def ok(result: Result) -> Any:
    assert result.returncode == 0, result.stderr
    return result.json()


def assert_labels(node_labels: list[dict[str, Any]], py_labels: list[Any]) -> None:
    assert [(x["label"], x["index"]) for x in node_labels] == [(x.label, x.index)
                                                               for x in py_labels]
    np.testing.assert_allclose([x["probability"] for x in node_labels],
                               [x.probability for x in py_labels], rtol=0, atol=1e-6)


@pytest.mark.parametrize("flags", [
    (),
    ("--no-raw",),  # repeated floats instead of raw bytes: the other decoding path
    ("--pooling", "cls", "--pooling-layer=-2", "--normalize"),
], ids=["raw", "values", "cls-layer-2-normalized"])
def test_unary_embed_matches_python(node_cli, address, py_embed, flags) -> None:  # type: ignore[no-untyped-def]
    out = ok(node_cli("--server", address, "--model", "tiny-embed", "embed", *TEXTS, *flags))
    assert [item["text"] for item in out] == TEXTS
    kw: dict[str, Any] = {}
    if "--pooling" in flags:
        kw = {"pooling": "cls", "pooling_layer": -2, "normalize": True}
    expected = py_embed.encode(TEXTS, **kw)
    got = np.asarray([item["embedding"] for item in out], dtype=np.float32)
    assert got.shape == expected.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_unary_classify_matches_python(node_cli, address, py_news) -> None:  # type: ignore[no-untyped-def]
    out = ok(node_cli("--server", address, "--model", "tiny-news", "classify", *TEXTS))
    expected = py_news.classify(TEXTS)
    assert [item["text"] for item in out] == TEXTS
    for item, labels in zip(out, expected, strict=True):
        assert {x["label"] for x in item["labels"]} == {"positive", "neutral", "negative"}
        assert_labels(item["labels"], labels)


def test_embed_stream_matches_python(node_cli, address, py_embed) -> None:  # type: ignore[no-untyped-def]
    out = ok(node_cli("--server", address, "--model", "tiny-embed", "embed-stream",
                      "--batch", "2", *TEXTS))
    batches = [TEXTS[i:i + 2] for i in range(0, len(TEXTS), 2)]
    expected = list(py_embed.encode_stream(batches))
    assert [m["request_id"] for m in out] == [str(i) for i in range(len(batches))]
    for message, texts, py in zip(out, batches, expected, strict=True):
        assert py.error is None and "error" not in message
        assert [item["text"] for item in message["items"]] == texts
        got = np.asarray([item["embedding"] for item in message["items"]], dtype=np.float32)
        np.testing.assert_allclose(got, py.value, rtol=0, atol=1e-5)
        # and the same vectors as a unary call
        np.testing.assert_allclose(got, py_embed.encode(texts), rtol=0, atol=1e-5)


def test_classify_stream_matches_python(node_cli, address, py_news) -> None:  # type: ignore[no-untyped-def]
    out = ok(node_cli("--server", address, "--model", "tiny-news", "classify-stream", *TEXTS))
    expected = list(py_news.classify_stream(TEXTS))
    assert [m["request_id"] for m in out] == [str(i) for i in range(len(TEXTS))]
    for message, text, py in zip(out, TEXTS, expected, strict=True):
        assert py.error is None and "error" not in message
        [item] = message["items"]
        assert item["text"] == text
        assert_labels(item["labels"], py.value[0])


def test_unknown_model_is_not_found(node_cli, address) -> None:  # type: ignore[no-untyped-def]
    unary = node_cli("--server", address, "--model", "no-such-model", "embed", TEXTS[0])
    assert unary.returncode != 0 and unary.stdout == ""
    assert json.loads(unary.stderr)["error"]["code"] == "NOT_FOUND", unary.stderr
    # In a stream the failed message carries the error and the stream goes on.
    stream = node_cli("--server", address, "--model", "no-such-model", "embed-stream",
                      *TEXTS[:2])
    assert stream.returncode != 0
    assert [m["error"]["code"] for m in stream.json()] == ["NOT_FOUND", "NOT_FOUND"]
    assert [m["error"]["grpc_code"] for m in stream.json()] == [5, 5]


# Serializes the requests the helper builds with the service's own serializers: what goes on
# the wire, without a server.
SERIALIZE = """
const { loadService, embedRequest, classifyRequest } = require(process.argv[1]);
const methods = loadService().service;
const wire = (method, request) => methods[method].requestSerialize(request).toString('hex');
process.stdout.write(JSON.stringify({
  embed: wire('Embed', embedRequest(['a'], { priority: 1, timeoutUs: 250000 }, 'm')),
  classify: wire('ClassifyStream',
    classifyRequest(['b'], { priority: 2, timeoutUs: '18446744073709551615' }, 'm')),
  plain: wire('Embed', embedRequest('c', {}, 'm')),
}));
"""


def test_priority_and_timeout_reach_the_wire(node: str) -> None:
    """The helper's `priority` and `timeoutUs` land in EmbedRequest / ClassifyRequest's
    priority and timeout_us (the .proto is loaded at run time: no stub to regenerate)."""
    proc = subprocess.run([node, "-e", SERIALIZE, str(NODE_DIR / "bertstream.js")],
                          capture_output=True, text=True, timeout=60, check=True)
    wire = {k: bytes.fromhex(v) for k, v in json.loads(proc.stdout).items()}
    embed = pb.EmbedRequest.FromString(wire["embed"])
    classify = pb.ClassifyRequest.FromString(wire["classify"])
    plain = pb.EmbedRequest.FromString(wire["plain"])
    assert (embed.model, list(embed.texts), embed.priority, embed.timeout_us) == \
        ("m", ["a"], 1, 250_000)
    assert (classify.priority, classify.timeout_us) == (2, 2**64 - 1)
    assert (plain.priority, plain.timeout_us) == (0, 0)  # the server decides


@pytest.mark.parametrize("flag", ["--priority=-1", "--priority=high", "--timeout-us=-5"])
def test_bad_priority_flags_are_usage_errors(node_cli, flag) -> None:  # type: ignore[no-untyped-def]
    result = node_cli("--server", "127.0.0.1:1", "embed", flag, TEXTS[0])
    assert result.returncode == 2 and result.stdout == ""
    assert flag.split("=")[0] in result.stderr


def test_priority_calls_match_python(node_cli, address, py_embed) -> None:  # type: ignore[no-untyped-def]
    """An interactive call and an interactive stream (level 1, with a queue timeout) answer
    as the Python client does."""
    flags = ("--priority", "1", "--timeout-us", "30000000")
    expected = py_embed.encode(TEXTS[:2], priority=1, timeout_us=30_000_000)
    unary = ok(node_cli("--server", address, "--model", "tiny-embed", "embed", *flags,
                        *TEXTS[:2]))
    got = np.asarray([item["embedding"] for item in unary], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    stream = ok(node_cli("--server", address, "--model", "tiny-embed", "embed-stream",
                         "--batch", "2", *flags, *TEXTS[:2]))
    [message] = stream
    got = np.asarray([item["embedding"] for item in message["items"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
