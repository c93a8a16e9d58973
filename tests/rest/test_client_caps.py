"""`--max-texts-in-flight-per-client`: one client (a bearer token, else a host) cannot fill the
queue others need. Its texts in flight count over HTTP and gRPC together; the excess is refused
at once (429 with Retry-After, RESOURCE_EXHAUSTED), another token's requests go on, and the
client's budget comes back as its answers do. Real server, fake device (200 ms batches)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx2
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from rest.conftest import HttpServer, start_http

if TYPE_CHECKING:
    from conftest import ServerProcess

CAP = 4
GREEDY, OTHER = "tgreedy-" + "g" * 20, "tother-" + "o" * 20
THREE = {"model": "tiny-embed", "input": ["股市", "央行", "降准"]}


@pytest.fixture(scope="module")
def capped(model_repository: Path, start_server: Callable[..., ServerProcess],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    tokens = tmp_path_factory.mktemp("caps") / "tokens"
    tokens.write_text(f"inference:{GREEDY}\ninference:{OTHER}\n", "utf-8")
    server = start_http(start_server, model_repository, "--auth-token-file", str(tokens),
                        "--max-texts-in-flight-per-client", str(CAP),
                        "--fake-device", "custom,a_ms=600,b_us=0", "--frontends", "1")
    yield server
    assert server.process.stop() == 0
    log = "".join(server.process.lines)
    assert "Traceback" not in log and GREEDY not in log


def _post(server: HttpServer, token: str) -> httpx2.Response:
    return httpx2.post(server.url + "/v1/embeddings", json=THREE, timeout=30,
                       headers={"authorization": f"Bearer {token}"})


def test_a_clients_excess_is_refused_at_once_and_others_go_on(capped: HttpServer) -> None:
    first: dict[str, httpx2.Response] = {}
    running = threading.Thread(target=lambda: first.update(reply=_post(capped, GREEDY)))
    running.start()
    time.sleep(0.2)  # its 3 texts are in their 600 ms batch: 3 of the cap of 4 in flight
    started = time.monotonic()
    refused = _post(capped, GREEDY)  # 3 more would make 6
    assert time.monotonic() - started < 0.5, "refused at once, not after a wait"
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "cap of 4" in refused.json()["error"]["message"]
    # The same token over gRPC.
    with grpc.insecure_channel(capped.address) as channel, \
            pytest.raises(grpc.RpcError) as over:
        pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model="tiny-embed", texts=["股市", "央行"]), timeout=30,
            metadata=[("authorization", f"Bearer {GREEDY}")])
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _post(capped, OTHER).status_code == 200  # another client is not held back
    running.join(30)
    assert first["reply"].status_code == 200
    assert _post(capped, GREEDY).status_code == 200  # its budget came back with its answers
