"""HTTP on a `--frontends 2` server: every front end binds the HTTP port with SO_REUSEPORT,
so fresh connections are spread over both and each answers as the one-process server does.
Which front end served is read from the supervisor's merged /metrics (`process` label)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
import numpy as np
from rest.conftest import cosine, grpc_embed, start_http

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS / "multiprocess") not in sys.path:
    sys.path.insert(0, str(TESTS / "multiprocess"))

from frontlib import FRONT_ENDS, metrics_port, requests_by_process  # noqa: E402

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元"]
LABEL = {"rpc": "openai:Embeddings", "model": "tiny-embed", "code": "OK"}


def test_fresh_connections_reach_both_front_ends(
        model_repository: Path, start_server: Callable[..., ServerProcess]) -> None:
    server = start_http(start_server, model_repository, "--frontends", "2",
                        "--metrics-port", "0")
    port = metrics_port(server.process)
    reference = grpc_embed(server.address, TEXTS)
    body = {"model": "tiny-embed", "input": TEXTS, "encoding_format": "float"}
    sent = 0
    # The kernel hashes each new connection to a front end: 16 at least, until both served
    # two (all of 16 on one front end: 1 in 30,000).
    while sent < 16 or min(requests_by_process(port, **LABEL)[f] for f in FRONT_ENDS) < 2:
        assert sent < 64, requests_by_process(port, **LABEL)
        with httpx2.Client(timeout=30) as fresh:  # a connection of its own
            reply = fresh.post(server.url + "/v1/embeddings", json=body)
        sent += 1
        assert reply.status_code == 200, reply.text
        vectors = np.array([d["embedding"] for d in reply.json()["data"]], np.float32)
        assert cosine(vectors, reference).min() >= 0.9999
    served = requests_by_process(port, **LABEL)
    assert set(served) == set(FRONT_ENDS) and sum(served.values()) == sent, served
    with httpx2.Client(timeout=30) as client:  # /v1/models from any front end: both models
        listed = {m["id"] for m in client.get(server.url + "/v1/models").json()["data"]}
    assert listed == {"tiny-embed", "tiny-news"}
    assert server.process.stop() == 0
    log = "".join(server.process.lines)
    assert "Traceback" not in log, log[-4000:]
