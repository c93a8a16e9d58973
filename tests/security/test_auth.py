"""Bearer tokens with two scopes, checked by the server's interceptor; health stays open."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from bertstream.client import BertClient, ClientError
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from conftest import ServerProcess

INFERENCE_TOKEN = "t" + secrets.token_urlsafe(24)  # a leading "-" would read as a flag
ADMIN_TOKEN = "t" + secrets.token_urlsafe(24)  # a leading "-" would read as a flag
ENV_TOKEN = "t" + secrets.token_urlsafe(24)  # a leading "-" would read as a flag


@pytest.fixture(scope="module")
def secured(model_repository: Path, start_server: Callable[..., ServerProcess],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"# who may call\ninference:{INFERENCE_TOKEN}\nadmin:{ADMIN_TOKEN}\n",
                      encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv("BERTSTREAM_AUTH_TOKENS", f"inference:{ENV_TOKEN}")
    try:
        server = start_server(model_repository, "--auth-token-file", str(tokens),
                              "--model-control-mode", "explicit", "--load-model", "*")
    finally:
        mp.undo()
    yield server
    assert server.stop() == 0
    log = "".join(server.lines)
    for token in (INFERENCE_TOKEN, ADMIN_TOKEN, ENV_TOKEN, "not-a-token"):
        assert token not in log
    assert "Traceback" not in log


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except ClientError as err:
        return err.code
    except grpc.RpcError as err:
        return err.code()
    return None


def _client(server: ServerProcess, token: str | None) -> BertClient:
    return BertClient(server.address, model="tiny-embed", timeout=10, token=token)


def test_inference_needs_a_known_token(secured: ServerProcess) -> None:
    for token in (None, "not-a-token", ADMIN_TOKEN[:-1]):
        with _client(secured, token) as bc:
            assert _code(lambda bc=bc: bc.encode("股市")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda bc=bc: list(bc.encode_stream(["股市"]))) == \
                grpc.StatusCode.UNAUTHENTICATED
    for token in (INFERENCE_TOKEN, ADMIN_TOKEN, ENV_TOKEN):
        with _client(secured, token) as bc:
            assert bc.encode(["股市", "央行"]).shape == (2, 64)
            assert [r.error for r in bc.encode_stream(["股市", "央行"])] == [None, None]


def test_malformed_authorization_metadata_is_refused(secured: ServerProcess) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        request = pb.EmbedRequest(model="tiny-embed", texts=["股市"])
        for value in (f"Basic {INFERENCE_TOKEN}", "Bearer", "Bearer  ", INFERENCE_TOKEN):
            with pytest.raises(grpc.RpcError) as failed:
                stub.Embed(request, metadata=(("authorization", value),), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in failed.value.details()


def test_admin_rpcs_need_the_admin_scope(secured: ServerProcess) -> None:
    with _client(secured, INFERENCE_TOKEN) as bc:
        assert bc.models()  # listing is inference scope
        assert _code(lambda: bc.load_model("tiny-news")) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: bc.unload_model("tiny-news")) == grpc.StatusCode.PERMISSION_DENIED
    with _client(secured, ADMIN_TOKEN) as bc:
        rows = bc.load_model("tiny-news")
        assert [r.state for r in rows] == ["READY"]


def test_health_stays_open(secured: ServerProcess) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_kserve_repository_rpcs_need_admin(secured: ServerProcess) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(secured.address)
    assert client.is_server_live() and client.is_server_ready()  # open, like health
    with pytest.raises(InferenceServerException) as failed:
        client.get_model_repository_index()
    assert "UNAUTHENTICATED" in str(failed.value.status())
    inference = {"authorization": f"Bearer {INFERENCE_TOKEN}"}
    assert client.get_server_metadata(headers=inference).name
    with pytest.raises(InferenceServerException) as failed:
        client.get_model_repository_index(headers=inference)
    assert "PERMISSION_DENIED" in str(failed.value.status())
    index = client.get_model_repository_index(
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert {m.name for m in index.models} >= {"tiny-embed", "tiny-news"}


def test_the_cli_sends_its_token(secured: ServerProcess) -> None:
    cli = [sys.executable, "-m", "bertstream.client", "--server", secured.address,
           "--model", "tiny-embed"]
    done = subprocess.run([*cli, "embed", "股市"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
    done = subprocess.run([*cli, f"--token={INFERENCE_TOKEN}", "embed", "股市"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("content", "message"), [
    ("reader:abcdefabcdefabcdef", "expected scope:token"),
    ("inference", "expected scope:token"),
    ("# nothing here\n", "no tokens"),
])
def test_a_bad_token_file_stops_the_server_without_echoing_it(
    model_repository: Path, tmp_path: Path, content: str, message: str,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "bertstream.server", "--model-repository",
                           str(model_repository), "--port", "0", "--auth-token-file",
                           str(tokens)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
    assert "abcdef" not in done.stderr and "Traceback" not in done.stderr
