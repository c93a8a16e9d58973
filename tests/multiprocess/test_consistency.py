"""A `--frontends 2` server answers as one process does, whichever front end a client lands on.

Each test reaches both front ends through clients that each have a connection of their own,
sorted by the front end that answered them (frontlib.py: the proof is the server's merged
/metrics), and compares what every front end says with what a single-process server says, or
with the existing tests' expectations (their helpers are called, not copied).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import pytest
from bertstream.client import BertClient
from bertstream.client.channels import call_metadata, tls_credentials
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from frontlib import (
    FRONT_ENDS,
    OWN_CONNECTION,
    metrics_port,
    open_channel,
    requests_by_process,
    sort_by_front_end,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

TESTS = Path(__file__).resolve().parents[1]
for _helpers in ("lifecycle", "integration", "security"):
    if str(TESTS / _helpers) not in sys.path:
        sys.path.insert(0, str(TESTS / _helpers))

import test_auth as auth  # noqa: E402
import test_streams as streams  # noqa: E402
from certlib import make_pki  # noqa: E402
from swaplib import (  # noqa: E402
    MODEL,
    PROBE,
    Load,
    make_repository,
    publish,
    reference_vector,
    wait_for,
)

if TYPE_CHECKING:
    from conftest import ServerProcess

T = TypeVar("T")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READY, UNLOADING, UNAVAILABLE = (pb.VERSION_STATE_READY, pb.VERSION_STATE_UNLOADING,
                                 pb.VERSION_STATE_UNAVAILABLE)
TWO = ("--frontends", "2", "--metrics-port", "0")
# Limits below the defaults, so the test also sees the flags reach every front end.
LIMITS = ("--max-texts-per-request", "8", "--max-text-chars", "300",
          "--max-request-chars", "600")
TEXT = "今天股市大涨，沪指收复三千点"
NEWS = pb.EmbedRequest(model="tiny-news", texts=[TEXT])


def _stub(channel: grpc.Channel) -> pb_grpc.BertServiceStub:
    return pb_grpc.BertServiceStub(channel)


def _probe(channel: grpc.Channel) -> None:
    """One counted call on the server's default model."""
    _stub(channel).Embed(pb.EmbedRequest(texts=["探针"]), timeout=30)


def _spread(server: ServerProcess, each: int) -> list[tuple[str, grpc.Channel]]:
    """Plaintext channels, `each` per front end (frontend-0, frontend-1, frontend-0, ...)."""
    return sort_by_front_end(lambda: open_channel(server.address), _probe,
                             metrics_port(server), each)


def _close(pinned: list[tuple[str, Any]]) -> None:
    for _, client in pinned:
        client.close()


def _at_once(calls: list[Callable[[], T]]) -> list[T]:
    """Run every call on its own thread, released together."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _outcome(call: Callable[..., Any], request: Any) -> tuple[str, str]:
    """(status code name, details) of a unary call: ("OK", "") when it succeeds."""
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    return "OK", ""


def _status(call: Callable[..., Any], request: Any,
            token: str | None) -> grpc.StatusCode | None:
    """test_auth's `_code` of one call made with `token` (a stream's answers are read)."""

    def run() -> None:
        answer = call(request, metadata=call_metadata(token), timeout=10)
        if isinstance(answer, Iterator):
            list(answer)

    return auth._code(run)


def _rows(channel: grpc.Channel) -> list[tuple[str, int, int, str]]:
    models = _stub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
    return [(m.model, m.version, m.state, m.reason) for m in models]


def _health(channel: grpc.Channel, service: str) -> int | str:
    """A service's status, or the code name when the check fails (NOT_FOUND: unknown)."""
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as exc:
        return exc.code().name


def _stopped(server: ServerProcess) -> None:
    assert server.stop() == 0, "".join(server.lines[-40:])
    assert "Traceback" not in "".join(server.lines), "".join(server.lines)


@pytest.fixture(scope="module")
def multi(model_repository: Path,
          start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """Two front ends over the shared repository (tiny-embed, tiny-news), lower limits."""
    server = start_server(model_repository, *TWO, *LIMITS)
    yield server
    _stopped(server)


@pytest.fixture(scope="module")
def single(model_repository: Path,
           start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """The same server as one process: what every front end must answer like."""
    server = start_server(model_repository, *LIMITS)
    yield server
    _stopped(server)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory,
           make_tiny_options: Callable[..., Any]) -> Path:
    """`swap` versions 1 and 2 with different seeds (so different vectors), as
    tests/lifecycle stages them."""
    from bertstream.export import export_model

    root = tmp_path_factory.mktemp("staged")
    for version in (1, 2):
        export_model(make_tiny_options(MODEL, root, seed=version - 1, version=version))
    return root


def _loaded_everywhere(channels: list[grpc.Channel], reference: grpc.Channel,
                       port: int) -> None:
    """LoadModel through the first channel (on frontend-0), then Embed through every channel
    at once: each answers with the model, as one process does, and ListModels agrees."""
    ref = _stub(reference)
    loaded = _stub(channels[0]).LoadModel(pb.LoadModelRequest(model="tiny-news"), timeout=60)
    before = requests_by_process(port, model="tiny-news", rpc="Embed", code="OK")
    answers = _at_once([lambda c=c: _stub(c).Embed(NEWS, timeout=30) for c in channels])
    assert loaded == ref.LoadModel(pb.LoadModelRequest(model="tiny-news"), timeout=60)
    expected = ref.Embed(NEWS, timeout=30)
    for answer in answers:
        assert (answer.model, answer.version) == ("tiny-news", 1)
        np.testing.assert_allclose(answer.embeddings[0].values, expected.embeddings[0].values,
                                   atol=1e-5)
    served = requests_by_process(port, model="tiny-news", rpc="Embed", code="OK") - before
    assert sum(served.values()) == len(channels), served
    assert all(served[front] >= 4 for front in FRONT_ENDS), served  # 4 pinned on each
    assert {_health(c, "tiny-news") for c in channels} == {SERVING}
    assert [_rows(c) for c in channels] == [_rows(reference)] * len(channels)


def _unloaded_everywhere(channels: list[grpc.Channel], reference: grpc.Channel) -> None:
    """UnloadModel through the second channel (on frontend-1), then Embed through every
    channel at once: each refuses as one process does, and ListModels agrees."""
    ref = _stub(reference)
    _stub(channels[1]).UnloadModel(pb.UnloadModelRequest(model="tiny-news"), timeout=60)
    refused = _at_once([lambda c=c: _outcome(_stub(c).Embed, NEWS) for c in channels])
    ref.UnloadModel(pb.UnloadModelRequest(model="tiny-news"), timeout=60)
    assert refused == [_outcome(ref.Embed, NEWS)] * len(channels)
    assert refused[0][0] == "UNAVAILABLE" and "unloaded by UnloadModel" in refused[0][1]
    assert {_health(c, "tiny-news") for c in [reference, *channels]} == {NOT_SERVING}
    for channel in channels:  # at once: the model's row; its version drains, then agrees
        rows = {(m, v): (state, why) for m, v, state, why in _rows(channel)}
        assert rows[("tiny-news", 0)] == (UNAVAILABLE, "unloaded by UnloadModel")
        assert rows[("tiny-news", 1)][0] in (UNLOADING, UNAVAILABLE)
    unloaded = ("tiny-news", 1, UNAVAILABLE, "unloaded: unloaded by UnloadModel")
    wait_for(lambda: unloaded in _rows(reference), 10, "the single process to unload")
    final = _rows(reference)
    wait_for(lambda: all(_rows(c) == final for c in channels), 10,
             "every front end to list what one process lists")


def test_load_and_unload_reach_every_front_end_before_they_answer(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """LoadModel answers once every front end routes to the model, UnloadModel once none
    does: calls right after it, through 4 channels pinned to each front end and 8 brand-new
    ones, plain stubs without retries, get what one process answers."""
    explicit = ("--model-control-mode", "explicit", "--load-model", "tiny-embed")
    server = start_server(model_repository, *TWO, *explicit)
    one = start_server(model_repository, *explicit)
    pinned = [channel for _, channel in _spread(server, each=4)]
    with open_channel(one.address) as reference:
        fresh = [open_channel(server.address) for _ in range(8)]
        _loaded_everywhere(pinned + fresh, reference, metrics_port(server))
        for request in (pb.LoadModelRequest(model="nope"), pb.UnloadModelRequest(model="nope")):
            rpc = type(request).__name__.removesuffix("Request")
            expected = _outcome(getattr(_stub(reference), rpc), request)
            assert expected[0] == "NOT_FOUND"
            for channel in pinned[:2]:  # one on each front end
                assert _outcome(getattr(_stub(channel), rpc), request) == expected
        fresh += [open_channel(server.address) for _ in range(8)]
        _unloaded_everywhere(pinned + fresh, reference)
    for channel in pinned + fresh:
        channel.close()
    _stopped(server)
    _stopped(one)


def test_poll_mode_swap_under_load_on_both_front_ends(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """tests/lifecycle's swap under load with the load spread over both front ends: every
    answer is the vector of the version it names, none fails, both front ends served both
    versions, and afterwards every front end routes to version 2 only."""
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    references = {v: reference_vector(staged / MODEL / str(v)) for v in (1, 2)}
    server = start_server(repository, *TWO, "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.5", default_model=MODEL)
    port = metrics_port(server)
    pinned = _spread(server, each=4)
    before = {v: requests_by_process(port, model=MODEL, version=v, code="OK") for v in "12"}
    handed = iter([channel for _, channel in pinned[:4]])  # 2 on each front end
    load = Load(server.address, connect=lambda _address: next(handed)).start()
    try:
        time.sleep(1.5)
        t0 = time.monotonic()
        publish(staged / MODEL / "2", repository / MODEL, 2)
        first = wait_for(lambda: next((a for a in list(load.answers)
                                        if a.at >= t0 and a.version == 2), None),
                          30, "version 2 to serve")
        wait_for(lambda: all((MODEL, 1, UNAVAILABLE) in [r[:3] for r in _rows(c)]
                              for _, c in pinned[4:]), 30, "version 1 to be unloaded")
        time.sleep(1.5)
    finally:
        answers = load.stop()
    errors = [a.error for a in answers if a.error]
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    assert len(answers) > 50 and {a.kind for a in answers} == {"unary", "stream"}
    assert {a.version for a in answers} == {1, 2}
    assert {a.version for a in answers if a.at > first.at + 1.0} == {2}
    for version, reference in references.items():
        vectors = np.array([a.vector for a in answers if a.version == version])
        np.testing.assert_allclose(vectors, np.broadcast_to(reference, vectors.shape),
                                   atol=1e-5)
    for version, counted in before.items():  # the probes above served version 1
        served = requests_by_process(port, model=MODEL, version=version, code="OK") - counted
        assert all(served[front] > 0 for front in FRONT_ENDS), (version, served)
    for _, channel in pinned[4:]:
        answer = _stub(channel).Embed(pb.EmbedRequest(texts=[PROBE]), timeout=30)
        assert answer.version == 2
        np.testing.assert_allclose(answer.embeddings[0].values, references[2], atol=1e-4)
        rows = {(m, v): state for m, v, state, _ in _rows(channel)}
        assert rows == {(MODEL, 1): UNAVAILABLE, (MODEL, 2): READY}
    _close(pinned[4:])
    print(f"two front ends: {len(answers)} answers, version 2 after {first.at - t0:.2f}s")
    _stopped(server)


def test_kserve_on_every_front_end(multi: ServerProcess, single: ServerProcess) -> None:
    """tests/integration/test_kserve.py's tritonclient checks, run against each front end;
    the reference answers come from the single-process server."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import test_kserve as kserve

    def connect() -> Any:
        return grpcclient.InferenceServerClient(multi.address, channel_args=OWN_CONNECTION)

    def probe(client: Any) -> None:
        client.infer("tiny-embed", [kserve.text_input(["探针"])])

    pinned = sort_by_front_end(connect, probe, metrics_port(multi), each=2)
    with BertClient(single.address, model="tiny-embed") as bc:
        for _, triton in pinned:
            kserve.test_health(triton)
            kserve.test_server_metadata(triton)
            kserve.test_model_metadata(triton)
            kserve.test_infer_embed_matches_bertclient(triton, bc)
            kserve.test_infer_classify_matches_bertclient(triton, single.address)
            kserve.test_requested_outputs_and_parameters(triton, bc)
    _close(pinned)


def test_limits_answer_as_one_process_does(multi: ServerProcess, single: ServerProcess) -> None:
    """Over-limit and invalid texts: the same status and message from every front end as from
    one process (the limits are flags, so both front ends must have been given them), in
    unary calls and as per-message errors of a stream."""
    bad = [
        pb.EmbedRequest(model="tiny-embed", texts=["字"] * 9),
        pb.EmbedRequest(model="tiny-embed", texts=["字" * 301]),
        pb.EmbedRequest(model="tiny-embed", texts=["字" * 250] * 3),
        pb.EmbedRequest(model="tiny-embed", texts=["长" * 100]),
        pb.EmbedRequest(model="tiny-embed", texts=["好", " \u3000"]),
        pb.EmbedRequest(model="no-such-model", texts=["好"]),
    ]
    pinned = _spread(multi, each=2)
    with open_channel(single.address) as reference:
        expected = [_outcome(_stub(reference).Embed, request) for request in bad]
        assert [code for code, _ in expected] == ["INVALID_ARGUMENT"] * 5 + ["NOT_FOUND"]
        assert "over the limit of 8" in expected[0][1] and "limit of 600" in expected[2][1]
        stream = [pb.EmbedRequest(request_id=str(i), model=r.model, texts=r.texts)
                  for i, r in enumerate([pb.EmbedRequest(model="tiny-embed", texts=["好"]),
                                         *bad])]
        expected_stream = list(_stub(reference).EmbedStream(iter(stream), timeout=60))
        for _, channel in pinned:
            assert [_outcome(_stub(channel).Embed, request) for request in bad] == expected
            got = list(_stub(channel).EmbedStream(iter(stream), timeout=60))
            assert [(r.request_id, r.error) for r in got] == \
                [(r.request_id, r.error) for r in expected_stream]
    _close(pinned)


def test_stream_errors_stay_per_message_on_every_front_end(multi: ServerProcess) -> None:
    """tests/integration/test_streams.py's stream with bad messages in the middle, on each
    front end: one answer per message, in order, each bad one with its own error."""
    pinned = _spread(multi, each=2)
    port = metrics_port(multi)
    before = requests_by_process(port, rpc="EmbedStream")
    for _, channel in pinned:
        streams.test_a_bad_message_gets_its_own_error_and_the_stream_goes_on(_stub(channel))
    answered = requests_by_process(port, rpc="EmbedStream") - before
    assert {front: answered[front] for front in FRONT_ENDS} == dict.fromkeys(FRONT_ENDS, 10)
    _close(pinned)


def test_health_on_every_front_end(multi: ServerProcess, single: ServerProcess) -> None:
    """The server, each model and the processes serve, on every front end; what one process
    reports for the server and the models, every front end reports."""
    services = ["", "bertstream.v1.BertService", "inference.GRPCInferenceService",
                "tiny-embed", "tiny-news", "no-such-model"]
    pinned = _spread(multi, each=4)
    with open_channel(single.address) as reference:
        expected = [_health(reference, service) for service in services]
    assert expected == [SERVING] * 5 + ["NOT_FOUND"]
    for _, channel in pinned:
        assert [_health(channel, service) for service in services] == expected
        assert _health(channel, "bertstream.processes") == SERVING
    _close(pinned)


def test_tokens_are_checked_on_every_front_end(
    model_repository: Path, start_server: Callable[..., ServerProcess], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/security/test_auth.py's tokens (file and environment) and scopes, on each front
    end: no token or an unknown one is UNAUTHENTICATED, an inference token may not load or
    unload (PERMISSION_DENIED), an admin token may, health stays open."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"inference:{auth.INFERENCE_TOKEN}\nadmin:{auth.ADMIN_TOKEN}\n",
                      encoding="utf-8")
    monkeypatch.setenv("BERTSTREAM_AUTH_TOKENS", f"inference:{auth.ENV_TOKEN}")
    server = start_server(model_repository, *TWO, "--auth-token-file", str(tokens),
                          "--model-control-mode", "explicit", "--load-model", "tiny-embed")
    monkeypatch.delenv("BERTSTREAM_AUTH_TOKENS")
    inference = call_metadata(auth.INFERENCE_TOKEN)
    embed = pb.EmbedRequest(model="tiny-embed", texts=[TEXT])
    pinned = sort_by_front_end(
        lambda: open_channel(server.address),
        lambda channel: _stub(channel).Embed(embed, metadata=inference, timeout=30),
        metrics_port(server), each=2)
    for _, channel in pinned:
        stub = _stub(channel)
        for token in (None, "not-a-token", auth.ADMIN_TOKEN[:-1]):
            assert _status(stub.Embed, embed, token) == grpc.StatusCode.UNAUTHENTICATED
            assert _status(stub.EmbedStream, iter([embed]), token) == \
                grpc.StatusCode.UNAUTHENTICATED
        for token in (auth.INFERENCE_TOKEN, auth.ADMIN_TOKEN, auth.ENV_TOKEN):
            assert _status(stub.Embed, embed, token) is None
            assert _status(stub.EmbedStream, iter([embed]), token) is None
        for rpc, request in ((stub.LoadModel, pb.LoadModelRequest(model="tiny-news")),
                             (stub.UnloadModel, pb.UnloadModelRequest(model="tiny-news"))):
            assert _status(rpc, request, auth.INFERENCE_TOKEN) == \
                grpc.StatusCode.PERMISSION_DENIED
        loaded = stub.LoadModel(pb.LoadModelRequest(model="tiny-news"),
                                metadata=call_metadata(auth.ADMIN_TOKEN), timeout=60)
        assert [v.state for v in loaded.versions] == [READY]
        assert _health(channel, "") == SERVING
    _close(pinned)
    _stopped(server)
    log = "".join(server.lines)
    for token in (auth.INFERENCE_TOKEN, auth.ADMIN_TOKEN, auth.ENV_TOKEN, "not-a-token"):
        assert token not in log


def test_mutual_tls_on_every_front_end(
    model_repository: Path, start_server: Callable[..., ServerProcess], single: ServerProcess,
    tmp_path: Path,
) -> None:
    """tests/security/test_tls.py's certificates: a client with a certificate from the CA is
    served by each front end (the same vectors as one plaintext process); a client without
    one, with a rogue CA's, or in plaintext is refused."""
    pki = make_pki(tmp_path)
    server = start_server(model_repository, *TWO, "--tls-cert", str(pki.server.cert),
                          "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca.cert))
    ok = tls_credentials(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key)
    pinned = sort_by_front_end(
        lambda: grpc.secure_channel(server.address, ok, options=OWN_CONNECTION), _probe,
        metrics_port(server), each=2)
    embed = pb.EmbedRequest(model="tiny-embed", texts=streams.NEWS[:3])
    with open_channel(single.address) as reference:
        expected = _stub(reference).Embed(embed, timeout=30)
    for _, channel in pinned:
        got = _stub(channel).Embed(embed, timeout=30)
        np.testing.assert_allclose([e.values for e in got.embeddings],
                                   [e.values for e in expected.embeddings], atol=1e-5)
    refused = {
        "no certificate": tls_credentials(ca=pki.ca.cert),
        "rogue CA's certificate": tls_credentials(ca=pki.ca.cert, cert=pki.rogue_client.cert,
                                                  key=pki.rogue_client.key),
    }
    for what, credentials in refused.items():
        for _ in range(4):
            with grpc.secure_channel(server.address, credentials,
                                     options=OWN_CONNECTION) as channel:
                assert _outcome(_stub(channel).Embed, embed)[0] == "UNAVAILABLE", what
    for _ in range(4):
        with open_channel(server.address) as channel:
            assert _outcome(_stub(channel).Embed, embed)[0] == "UNAVAILABLE", "plaintext"
    _close(pinned)
    _stopped(server)
