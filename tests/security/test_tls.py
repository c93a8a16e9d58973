"""TLS and mutual TLS on the gRPC port, with certificates made at test time."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from bertstream.client import BertClient, ClientError
from bertstream.client.channels import tls_credentials
from certlib import Pki, make_pki

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["央行宣布降准", "今天股市大涨"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _encode(address: str, credentials: grpc.ChannelCredentials | None) -> object:
    with BertClient(address, model="tiny-embed", timeout=10, credentials=credentials) as bc:
        return bc.encode(TEXTS)


def test_tls_serves_clients_that_trust_its_ca_only(
    model_repository: Path, start_server: Callable[..., ServerProcess], pki: Pki,
) -> None:
    server = start_server(model_repository, "--tls-cert", str(pki.server.cert),
                          "--tls-key", str(pki.server.key))
    vectors = _encode(server.address, tls_credentials(ca=pki.ca.cert))
    assert vectors.shape == (2, 64)
    localhost = "localhost:" + server.address.rsplit(":", 1)[1]
    assert _encode(localhost, tls_credentials(ca=pki.ca.cert)).shape == (2, 64)
    for credentials in (None, tls_credentials(ca=pki.rogue_client.cert)):
        with pytest.raises(ClientError) as failed:
            _encode(server.address, credentials)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.stop() == 0


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(
    model_repository: Path, start_server: Callable[..., ServerProcess], pki: Pki,
    tmp_path: Path,
) -> None:
    server = start_server(model_repository, "--tls-cert", str(pki.server.cert),
                          "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca.cert))
    ok = tls_credentials(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key)
    assert _encode(server.address, ok).shape == (2, 64)
    refused = {
        "no certificate": tls_credentials(ca=pki.ca.cert),
        "rogue CA's certificate": tls_credentials(ca=pki.ca.cert, cert=pki.rogue_client.cert,
                                                  key=pki.rogue_client.key),
        "plaintext": None,
    }
    for what, credentials in refused.items():
        with pytest.raises(ClientError) as failed:
            _encode(server.address, credentials)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE, what

    # The command line and the bulk feed take the same files.
    tls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert),
           "--tls-key", str(pki.client.key)]
    cli = [sys.executable, "-m", "bertstream.client", "--server", server.address, *tls]
    done = subprocess.run([*cli, "embed", "--model", "tiny-embed", *TEXTS],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 2
    feed_in, feed_out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    feed_in.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                               for i, t in enumerate(TEXTS * 50)), encoding="utf-8")
    done = subprocess.run([*cli, "embed", "--model", "tiny-embed", "--input", str(feed_in),
                           "--output", str(feed_out), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["answered"] == 100
    done = subprocess.run([*cli[:5], "--tls-ca", str(pki.ca.cert), "models"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
    assert "Traceback" not in done.stderr
    assert server.stop() == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-cert", "x.crt"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.crt"], "--tls-client-ca needs --tls-cert"),
    (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"], "not a readable file"),
])
def test_bad_tls_flags_are_refused_at_start(model_repository: Path, flags: list[str],
                                            message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bertstream.server", "--model-repository",
                           str(model_repository), "--port", "0", *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
