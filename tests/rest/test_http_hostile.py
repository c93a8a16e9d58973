"""Hostile bodies against every HTTP dialect's inference route on the shared HTTP server:
random JSON values, the right field names with wrong types, huge and non-finite numbers, deep
nesting, invalid UTF-8, lone surrogates and bytes that are not JSON at all.

Every reply is an answer or the dialect's refusal (a 4xx), never a 500, and comes within the
client's timeout; the server answers a normal request correctly afterwards, and its log has
no traceback and never quotes a body: every body carries MARKER somewhere likely, and MARKER
never reaches the log.

ENDPOINTS is the list to extend as dialects land: a route the server does not have yet
(Starlette's own plain-text 404) is skipped with its name, not failed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest.conftest import HttpServer, cosine, grpc_embed

MARKER = "hostile-marker-5c1d9e"


@dataclass(frozen=True)
class Endpoint:
    path: str
    fields: tuple[str, ...]  # the body's own field names, filled with anything
    tensor_fields: tuple[str, ...] = ()  # KServe: the fields of each of `inputs`' items


# Every dialect's inference route (server/rest/*.py). Extend as routes are added.
ENDPOINTS = (
    Endpoint("/v1/embeddings", ("input", "model", "encoding_format", "user", "dimensions")),
    Endpoint("/embed", ("inputs", "normalize", "truncate", "truncation_direction",
                        "prompt_name", "dimensions")),
    Endpoint("/predict", ("inputs", "raw_scores", "truncate", "truncation_direction")),
    Endpoint("/tokenize", ("inputs", "add_special_tokens", "prompt_name")),
    Endpoint("/encode", ("id", "texts", "is_tokenized")),
    Endpoint("/v2/models/tiny-embed/infer", ("id", "inputs", "outputs", "parameters"),
             ("name", "shape", "datatype", "data", "parameters")),
)

STRINGS = st.one_of(
    st.text(max_size=30),
    st.text(max_size=10).map(lambda t: t + MARKER),
    st.sampled_from(["", " ", "\x00", "\u200b", "tiny-embed", "tiny-news", "float", "base64",
                     "TEXT", "BYTES", "FP32", "INT64", "left", "right", "binary_data",
                     MARKER]),
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30,
                     10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(STRINGS, inner, max_size=5)), max_leaves=24)
# What shape-aware code would most likely get wrong: lists of texts with a bad one inside.
TEXT_LISTS = st.lists(st.one_of(STRINGS, SCALARS, st.lists(SCALARS, max_size=3)),
                      min_size=1, max_size=8)

# Bodies that are not JSON, or not JSON orjson takes: bytes in JSON's clothes.
RAW = st.one_of(
    st.binary(max_size=200).map(lambda b: b + MARKER.encode()),
    st.binary(min_size=1, max_size=40).map(
        lambda b: b'{"input": "' + MARKER.encode() + b + b'", "inputs": "x", "texts": ["y"]}'),
    st.sampled_from([
        b"", b"null", b"[]", b"{}", b'"' + MARKER.encode() + b'"', b"NaN", b"Infinity",
        b'{"input": NaN}', b'{"inputs": 1e999}', b'{"texts": [-1e999]}',
        b'{"input": "\\ud800' + MARKER.encode() + b'"}',  # a lone surrogate, escaped
        b'{"inputs": ["\xed\xa0\x80' + MARKER.encode() + b'"]}',  # encoded: not UTF-8
        b'{"texts": ["\xff\xfe' + MARKER.encode() + b'"]}',
        b'{"input": "' + MARKER.encode() + b'"',  # cut short
        b'{"input": 1' + b"0" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"\xef\xbb\xbf" + b'{"input": "' + MARKER.encode() + b'"}',  # a UTF-8 BOM
        b'{"input": "a", "input": {"' + MARKER.encode() + b'": 1}}',  # a key twice
    ]),
)

HYPOTHESIS = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example,
                           HealthCheck.function_scoped_fixture],
)


def shaped(endpoint: Endpoint) -> st.SearchStrategy[dict[str, Any]]:
    """The endpoint's own field names (and a stray one), each with any value or a text list;
    KServe's `inputs` gets tensors with any values in their fields."""
    value = st.one_of(VALUES, TEXT_LISTS)
    optional = {name: value for name in endpoint.fields}
    if endpoint.tensor_fields:
        tensor = st.fixed_dictionaries(
            {}, optional={name: st.one_of(value, st.lists(NUMBERS, max_size=4))
                          for name in endpoint.tensor_fields})
        optional["inputs"] = st.one_of(value, st.lists(tensor, min_size=1, max_size=3))
    return st.fixed_dictionaries({}, optional={**optional, MARKER: VALUES})


class Judge:
    """Sends bodies to one endpoint and holds every reply to the rules."""

    def __init__(self, server: HttpServer, client: httpx2.Client, endpoint: Endpoint) -> None:
        self.server, self.client, self.endpoint = server, client, endpoint
        missing = client.post(endpoint.path, content=b"{}",
                              headers={"content-type": "application/json"})
        if missing.status_code == 404 and missing.text == "Not Found":
            pytest.skip(f"{endpoint.path} is not served yet: extend when its dialect lands")

    def send(self, body: bytes, content_type: str = "application/json") -> httpx2.Response:
        try:
            reply = self.client.post(self.endpoint.path, content=body,
                                     headers={"content-type": content_type})
        except httpx2.TimeoutException:
            pytest.fail(f"{self.endpoint.path}: no answer within the timeout to {body[:300]!r}")
        assert reply.status_code < 500, (self.endpoint.path, reply.status_code, reply.text,
                                         body[:300])
        assert reply.status_code >= 200, reply.status_code
        assert "Traceback" not in reply.text and 'File "' not in reply.text
        if reply.status_code >= 400:
            assert reply.headers["content-type"].startswith("application/json"), reply.text
            reply.json()
        return reply

    def send_json(self, value: Any) -> httpx2.Response:
        # json, not orjson: integers past 64 bits must reach the server as written.
        return self.send(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def client(http_server: HttpServer) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=http_server.url, timeout=20) as opened:
        yield opened


@pytest.fixture(scope="module")
def log_start(http_server: HttpServer) -> int:
    """Where this module's part of the shared server's log begins."""
    return len(http_server.process.lines)


@pytest.fixture(params=ENDPOINTS, ids=[e.path for e in ENDPOINTS])
def judge(request: pytest.FixtureRequest, http_server: HttpServer, client: httpx2.Client,
          log_start: int) -> Judge:
    return Judge(http_server, client, request.param)


@HYPOTHESIS
@given(data=st.data())
def test_fields_with_anything_in_them(judge: Judge, data: st.DataObject) -> None:
    judge.send_json(data.draw(shaped(judge.endpoint)))


@HYPOTHESIS
@given(value=VALUES)
def test_any_json_value(judge: Judge, value: Any) -> None:
    judge.send_json(value)


@HYPOTHESIS
@given(body=RAW, content_type=st.sampled_from(
    ["application/json", "text/plain", "application/octet-stream", "multipart/form-data"]))
def test_bytes_that_are_not_json(judge: Judge, body: bytes, content_type: str) -> None:
    judge.send(body, content_type)


def test_the_server_is_still_well_and_quiet(http_server: HttpServer, client: httpx2.Client,
                                            log_start: int) -> None:
    """Last: a normal request gets gRPC's vectors; nothing above reached the log."""
    texts = ["今天股市大涨", MARKER]
    reply = client.post("/v1/embeddings", json={"model": "tiny-embed", "input": texts,
                                                "encoding_format": "float"})
    assert reply.status_code == 200
    vectors = np.array([d["embedding"] for d in reply.json()["data"]], np.float32)
    assert cosine(vectors, grpc_embed(http_server.address, texts)).min() >= 0.9999
    log = "".join(http_server.process.lines[log_start:])
    assert "Traceback" not in log, log[-4000:]
    assert MARKER not in log, log[-4000:]
