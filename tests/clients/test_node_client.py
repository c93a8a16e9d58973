"""The Node.js example client (client/examples/node) against a real server: its vectors,
labels and errors must match the Python client's for the same texts.

Skipped only where `node` or `npm` is missing, or where `npm ci` cannot reach the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from bertstream.client import BertClient
from nodelib import Result, node_with_modules, run_cli

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
def node_cli() -> Callable[..., Result]:
    """`node_cli(*args)`: runs cli.js; installs the pinned modules with `npm ci` first when
    node_modules lacks them."""
    node = node_with_modules("Node.js client test")

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
