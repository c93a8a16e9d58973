"""The Node.js client (client/examples/node) against a server with mutual TLS and bearer
tokens: its --tls-* / --token options must reach the server as the Python client's do.

Skipped only where `node` or `npm` is missing, or where `npm ci` cannot reach the registry;
tests/clients/test_node_client.py covers the calls themselves.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from bertstream.client import BertClient
from bertstream.client.channels import tls_credentials
from certlib import Pki, make_pki
from nodelib import NODE_DIR, Result, node_with_modules, run_cli

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["今天股市大涨，沪指收复三千点", "央行宣布降准，股市应声大涨", "颱風來襲，學校停課一天"]
INFERENCE_TOKEN = "t" + secrets.token_urlsafe(24)  # a leading "-" would read as a flag
ADMIN_TOKEN = "t" + secrets.token_urlsafe(24)  # a leading "-" would read as a flag
WRONG_TOKEN = "t" + secrets.token_urlsafe(24)  # a leading "-" would read as a flag
TOKENS = (INFERENCE_TOKEN, ADMIN_TOKEN, WRONG_TOKEN)


@pytest.fixture(scope="module")
def node_cli() -> Callable[..., Result]:
    """`node_cli(*args, env=None)`: runs cli.js with BERTSTREAM_TOKEN unset unless `env`
    sets it; checks that no token ever appears in what it prints."""
    node = node_with_modules("Node.js TLS/token test")
    base_env = {k: v for k, v in os.environ.items() if k != "BERTSTREAM_TOKEN"}

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        result = run_cli(node, *args, env={**base_env, **(env or {})})
        for token in TOKENS:
            assert token not in result.stdout + result.stderr
        assert "    at " not in result.stderr, result.stderr  # no stack trace
        return result

    return run


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(model_repository: Path, start_server: Callable[..., ServerProcess], pki: Pki,
           tmp_path_factory: pytest.TempPathFactory,
           node_cli: Callable[..., Result]) -> Iterator[ServerProcess]:
    """One server for the module: mutual TLS and an inference and an admin token."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"inference:{INFERENCE_TOKEN}\nadmin:{ADMIN_TOKEN}\n", encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.delenv("BERTSTREAM_AUTH_TOKENS", raising=False)
    try:
        proc = start_server(model_repository, "--tls-cert", str(pki.server.cert),
                            "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca.cert),
                            "--auth-token-file", str(tokens))
    finally:
        mp.undo()
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-40:])
    log = "".join(proc.lines)
    for token in TOKENS:
        assert token not in log
    assert "Traceback" not in log


def tls_flags(pki: Pki, client_cert: bool = True) -> list[str]:
    flags = ["--tls-ca", str(pki.ca.cert)]
    if client_cert:
        flags += ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    return flags


def embed(node_cli: Callable[..., Result], server: ServerProcess, *flags: str,
          command: str = "embed", env: dict[str, str] | None = None) -> Result:
    return node_cli("--server", server.address, "--model", "tiny-embed", "--timeout", "20",
                    command, *flags, *TEXTS, env=env)


def ok(result: Result) -> Any:
    assert result.returncode == 0, result.stderr
    return result.json()


@pytest.fixture(scope="module")
def python_vectors(server: ServerProcess, pki: Pki) -> np.ndarray:
    credentials = tls_credentials(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key)
    with BertClient(server.address, model="tiny-embed", timeout=20, credentials=credentials,
                    token=INFERENCE_TOKEN) as bc:
        return np.asarray(bc.encode(TEXTS))


def test_mutual_tls_and_token_match_python(node_cli, server, pki, python_vectors) -> None:  # type: ignore[no-untyped-def]
    out = ok(embed(node_cli, server, *tls_flags(pki), "--token", INFERENCE_TOKEN))
    assert [item["text"] for item in out] == TEXTS
    got = np.asarray([item["embedding"] for item in out], dtype=np.float32)
    assert got.shape == python_vectors.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, python_vectors, rtol=0, atol=1e-5)


def test_token_from_environment_and_server_name(node_cli, server, pki, python_vectors) -> None:  # type: ignore[no-untyped-def]
    # $BERTSTREAM_TOKEN is the default; an admin token may call what inference may.
    out = ok(embed(node_cli, server, *tls_flags(pki), env={"BERTSTREAM_TOKEN": ADMIN_TOKEN}))
    got = np.asarray([item["embedding"] for item in out], dtype=np.float32)
    np.testing.assert_allclose(got, python_vectors, rtol=0, atol=1e-5)
    # --token wins over the environment.
    refused = embed(node_cli, server, *tls_flags(pki), "--token", WRONG_TOKEN,
                    env={"BERTSTREAM_TOKEN": INFERENCE_TOKEN})
    assert refused.error_code() == "UNAUTHENTICATED", refused.stderr
    # --tls-server-name: the certificate is checked against that name, not the address's host.
    named = embed(node_cli, server, *tls_flags(pki), "--tls-server-name", "localhost",
                  "--token", INFERENCE_TOKEN)
    assert len(ok(named)) == len(TEXTS)
    wrong = embed(node_cli, server, *tls_flags(pki), "--tls-server-name", "bert.example.com",
                  "--token", INFERENCE_TOKEN)
    assert wrong.error_code() == "UNAVAILABLE", wrong.stderr


def test_without_client_certificate_is_unavailable(node_cli, server, pki) -> None:  # type: ignore[no-untyped-def]
    for flags in (tls_flags(pki, client_cert=False),  # TLS, but no client certificate
                  [*tls_flags(pki, client_cert=False), "--tls-cert", str(pki.rogue_client.cert),
                   "--tls-key", str(pki.rogue_client.key)],  # a certificate from another CA
                  []):  # plaintext
        result = embed(node_cli, server, *flags, "--token", INFERENCE_TOKEN)
        assert result.error_code() == "UNAVAILABLE", (flags, result.stderr)


@pytest.mark.parametrize("token", [None, WRONG_TOKEN, INFERENCE_TOKEN[:-1]],
                         ids=["no-token", "wrong-token", "truncated-token"])
@pytest.mark.parametrize("command", ["embed", "embed-stream"])
def test_without_a_known_token_is_unauthenticated(node_cli, server, pki, token,  # type: ignore[no-untyped-def]
                                                  command) -> None:
    flags = tls_flags(pki) + (["--token", token] if token else [])
    result = embed(node_cli, server, *flags, command=command)
    assert result.error_code() == "UNAUTHENTICATED", result.stderr


def test_embed_stream_with_token(node_cli, server, pki, python_vectors) -> None:  # type: ignore[no-untyped-def]
    out = ok(embed(node_cli, server, *tls_flags(pki), "--token", INFERENCE_TOKEN, "--batch", "2",
                   command="embed-stream"))
    assert [m["request_id"] for m in out] == ["0", "1"]
    assert all("error" not in m for m in out)
    items = [item for m in out for item in m["items"]]
    assert [item["text"] for item in items] == TEXTS
    got = np.asarray([item["embedding"] for item in items], dtype=np.float32)
    np.testing.assert_allclose(got, python_vectors, rtol=0, atol=1e-5)


def test_library_takes_buffers(server, pki, python_vectors, node_cli) -> None:  # type: ignore[no-untyped-def]
    """BertClient itself: PEM Buffers, serverName and a token, unary and stream."""
    script = """
const fs = require('fs');
const { BertClient } = require(process.argv[1]);
const [address, ca, cert, key] = process.argv.slice(2);
(async () => {
  const bc = new BertClient(address, {
    model: 'tiny-embed', serverName: 'localhost', token: process.env.TEST_TOKEN,
    tls: { ca: fs.readFileSync(ca), cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
  });
  try {
    const texts = JSON.parse(process.env.TEST_TEXTS);
    const { vectors } = await bc.embed(texts);
    const stream = await bc.embedStream(texts);
    console.log(JSON.stringify({ unary: vectors.map((v) => Array.from(v)),
      stream: stream.map((r) => Array.from(r.value.vectors[0])) }));
  } finally {
    bc.close();
  }
})().catch((err) => { console.error(err.codeName || err.message); process.exitCode = 1; });
"""
    node = shutil.which("node")
    assert node is not None
    env = {**os.environ, "TEST_TOKEN": INFERENCE_TOKEN,
           "TEST_TEXTS": json.dumps(TEXTS, ensure_ascii=False)}
    proc = subprocess.run([node, "-e", script, str(NODE_DIR / "bertstream.js"), server.address,
                           str(pki.ca.cert), str(pki.client.cert), str(pki.client.key)],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("unary", "stream"):
        np.testing.assert_allclose(np.asarray(out[key], dtype=np.float32), python_vectors,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-ca", "/nonexistent/ca.crt"], "--tls-ca: cannot read /nonexistent/ca.crt: ENOENT"),
    (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "KEY"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "CERT", "--tls-key", "/nonexistent/client.key"],
     "--tls-key: cannot read /nonexistent/client.key: ENOENT"),
    (["--tls-cert", "CERT", "--tls-key", "ROGUE_KEY"], "invalid TLS files"),
    (["--tls-server-name", "localhost"], "--tls-server-name needs --tls"),
    (["--token", f"{WRONG_TOKEN}\nx"], "token must be printable ASCII"),
], ids=["missing-ca", "cert-without-key", "key-without-cert", "missing-key", "key-mismatch",
        "server-name-without-tls", "bad-token"])
def test_bad_options_exit_2_with_a_json_error(node_cli, pki, flags, message) -> None:  # type: ignore[no-untyped-def]
    paths = {"CERT": str(pki.client.cert), "KEY": str(pki.client.key),
             "ROGUE_KEY": str(pki.rogue_client.key)}
    # Nothing listens on port 1: these must fail before any connection is tried.
    result = node_cli("--server", "127.0.0.1:1", *[paths.get(f, f) for f in flags],
                      "embed", "股市")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "USAGE" and message in error["message"], error
