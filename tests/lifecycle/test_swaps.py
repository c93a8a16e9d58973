"""Zero-downtime version swaps under continuous load, in poll and explicit mode.

Every answer must succeed, name the version that served it, and carry that version's vector
(versions differ by their random seed, so a wrong routing shows as a wrong vector)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from swaplib import (
    MODEL,
    PROBE,
    Answer,
    Load,
    list_models,
    make_repository,
    publish,
    reference_vector,
    wait_for,
)

if TYPE_CHECKING:
    from conftest import ServerProcess

POLL = 0.5
READY, UNAVAILABLE = pb.VERSION_STATE_READY, pb.VERSION_STATE_UNAVAILABLE


def _served_since(load: Load, since: float, version: int) -> Answer | None:
    return next((a for a in list(load.answers) if a.at >= since and a.version == version), None)


def _check_answers(answers: list[Answer], references: dict[int, np.ndarray]) -> None:
    errors = [a.error for a in answers if a.error]
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    for answer in answers:
        assert answer.version in references, answer.version
        assert answer.vector is not None
        np.testing.assert_allclose(answer.vector, references[answer.version], atol=1e-4)


def test_poll_mode_swaps_under_load(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    model_dir = repository / MODEL
    references = {v: reference_vector(staged / MODEL / str(v)) for v in (1, 2)}
    server = start_server(repository, "--model-control-mode", "poll",
                          "--repository-poll-secs", str(POLL), default_model=MODEL)
    load = Load(server.address).start()
    started = time.monotonic()
    try:
        time.sleep(2)
        # 1. a new version: served within poll interval + load time, the old one retired.
        t0 = time.monotonic()
        publish(staged / MODEL / "2", model_dir, 2)
        first = wait_for(lambda: _served_since(load, t0, 2), 30, "version 2 to serve")
        switch_s = first.at - t0
        wait_for(lambda: list_models(server.address).get((MODEL, 1), (0,))[0] == UNAVAILABLE,
                 30, "version 1 to be unloaded")
        time.sleep(1)
        assert {a.version for a in load.answers if a.at > first.at + 1.0} == {2}

        # 2. a corrupt version 3 never replaces 2, and says why.
        corrupt = tmp_path / "corrupt"
        shutil.copytree(staged / MODEL / "2", corrupt)
        (corrupt / "model.onnx").write_bytes(b"this is not an ONNX graph")
        publish(corrupt, model_dir, 3)
        _, reason = wait_for(
            lambda: list_models(server.address).get((MODEL, 3), (0, ""))[0] == UNAVAILABLE
            and list_models(server.address)[(MODEL, 3)], 30, "version 3 to fail")
        assert "load failed" in reason and "model.onnx" in reason, reason
        t1 = time.monotonic()
        time.sleep(3 * POLL)
        assert {a.version for a in load.answers if a.at > t1} == {2}, "2 keeps serving"

        # 3. version 2's folder removed: the next loadable version (1) takes over, then 2 goes.
        t2 = time.monotonic()
        shutil.rmtree(model_dir / "2")
        wait_for(lambda: _served_since(load, t2, 1), 30, "version 1 to serve again")
        wait_for(lambda: (MODEL, 2) not in list_models(server.address), 30, "2 to be forgotten")
        time.sleep(max(0.0, 20 - (time.monotonic() - started)))  # at least 20 s of load
    finally:
        answers = load.stop()
    assert len(answers) > 200, len(answers)
    assert {a.kind for a in answers} == {"unary", "stream"}
    _check_answers(answers, references)
    assert switch_s < 2 * POLL + 10, switch_s
    print(f"poll mode: {len(answers)} answers, switch to version 2 after {switch_s:.2f}s")
    assert server.stop() == 0


def test_explicit_mode_load_and_unload_under_load(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1], "news": [1]})
    references = {v: reference_vector(staged / MODEL / str(v)) for v in (1, 2)}
    server = start_server(repository, "--model-control-mode", "explicit",
                          "--load-model", MODEL, "--load-model", "news", default_model=MODEL)
    load = Load(server.address).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.BertServiceStub(channel)
            time.sleep(2)
            publish(staged / MODEL / "2", repository / MODEL, 2)
            time.sleep(1)
            assert {a.version for a in list(load.answers)[-20:]} == {1}, "explicit: no polling"
            t0 = time.monotonic()
            response = stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
            loaded_s = time.monotonic() - t0
            states = {s.version: s.state for s in response.versions}
            assert states[2] == READY and states[1] != READY, response
            wait_for(lambda: _served_since(load, t0 + loaded_s, 2), 10, "version 2 to serve")
            time.sleep(1)

            stub.UnloadModel(pb.UnloadModelRequest(model="news"), timeout=60)
            rows = list_models(server.address)
            assert rows[("news", 1)][0] in (pb.VERSION_STATE_UNLOADING, UNAVAILABLE)
            assert "UnloadModel" in rows[("news", 0)][1]
            try:
                stub.Classify(pb.ClassifyRequest(model="news", texts=["好"]), timeout=10)
                raise AssertionError("an unloaded model answered")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            stub.LoadModel(pb.LoadModelRequest(model="news"), timeout=60)
            assert stub.Classify(pb.ClassifyRequest(model="news", texts=["好"]), timeout=10)
            time.sleep(2)
    finally:
        answers = load.stop()
    _check_answers(answers, references)
    assert {a.version for a in answers} == {1, 2}
    print(f"explicit mode: {len(answers)} answers, LoadModel swap took {loaded_s:.2f}s")
    assert server.stop() == 0


def _health(address: str, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_poll_mode_follows_models_added_and_removed(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    from grpc_health.v1 import health_pb2

    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    server = start_server(repository, "--model-control-mode", "poll",
                          "--repository-poll-secs", str(POLL), default_model=MODEL)
    assert "news" not in {model for model, _ in list_models(server.address)}
    hidden = repository / ".news-incoming"
    make_repository(staged, hidden, {"news": [1]})
    (hidden / "news").rename(repository / "news")
    wait_for(lambda: list_models(server.address).get(("news", 1), (0,))[0] == READY, 30,
             "the added model to load")
    assert _health(server.address, "news") == serving
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        assert stub.Classify(pb.ClassifyRequest(model="news", texts=["好"]), timeout=10).results
        shutil.rmtree(repository / "news")
        wait_for(lambda: "news" not in {m for m, _ in list_models(server.address)}, 30,
                 "the removed model to go")
        assert _health(server.address, "news") == not_serving
        try:
            stub.Classify(pb.ClassifyRequest(model="news", texts=["好"]), timeout=10)
            raise AssertionError("a removed model answered")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Embed(pb.EmbedRequest(model=MODEL, texts=["好"]), timeout=10).embeddings
    assert _health(server.address, "") == serving
    assert server.stop() == 0


def test_version_policy_and_requests_that_name_a_version(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """latest { num_versions: 2 } serves both; a request names one or gets the highest; a
    switch to specific { versions: [1] } pins version 1 through LoadModel."""
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1, 2]})
    config = repository / MODEL / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    assert "num_versions: 1" in text
    config.write_text(text.replace("num_versions: 1", "num_versions: 2"), encoding="utf-8")
    references = {v: reference_vector(staged / MODEL / str(v)) for v in (1, 2)}
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", MODEL,
                          default_model=MODEL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)

        def embed(version: int) -> pb.EmbedResponse:
            return stub.Embed(pb.EmbedRequest(texts=[PROBE], version=version), timeout=10)

        for version, expected in ((0, 2), (1, 1), (2, 2)):
            answer = embed(version)
            assert answer.version == expected
            np.testing.assert_allclose(answer.embeddings[0].values, references[expected],
                                       atol=1e-4)
        info = stub.GetModel(pb.GetModelRequest(model=MODEL), timeout=10)
        assert list(info.ready_versions) == [1, 2] and info.default_version == 2

        latest, specific = "latest {\n    num_versions: 1\n  }", "specific {\n    versions: 1\n  }"
        pinned = text.replace(latest, specific)
        assert pinned != text, text
        config.write_text(pinned, encoding="utf-8")
        stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        assert embed(0).version == 1
        with pytest.raises(grpc.RpcError) as error:
            embed(2)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    assert server.stop() == 0


def test_a_swap_between_engines_under_load(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """config.pbtxt edited under load: the version reloads on OpenVINO beside the serving
    onnxruntime one, routing switches, and back again; no request fails or is misrouted."""
    pytest.importorskip("openvino")
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    config = repository / MODEL / "config.pbtxt"
    plain = config.read_text("utf-8")
    reference = reference_vector(staged / MODEL / "1")
    server = start_server(repository, "--model-control-mode", "poll",
                          "--repository-poll-secs", str(POLL), default_model=MODEL)

    def provider() -> str:
        with grpc.insecure_channel(server.address) as channel:
            return pb_grpc.BertServiceStub(channel).GetModel(
                pb.GetModelRequest(model=MODEL), timeout=10).execution_provider

    load = Load(server.address).start()
    try:
        time.sleep(1)
        for engine, text in (("OpenVINO", plain + 'backend: "openvino"\n'),
                             ("CPUExecutionProvider", plain)):
            config.write_text(text, "utf-8")
            wait_for(lambda engine=engine: provider().startswith(engine), 30,
                     f"{engine} to serve")
            time.sleep(2)
    finally:
        answers = load.stop()
    errors = [a.error for a in answers if a.error]
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    assert len(answers) > 100 and {a.kind for a in answers} == {"unary", "stream"}
    for answer in answers:  # bf16 or f32: the same vector as the graph gives
        assert answer.version == 1 and answer.vector is not None
        cosine = answer.vector @ reference / np.linalg.norm(answer.vector) / np.linalg.norm(
            reference)
        assert cosine >= 0.999, cosine
    assert server.stop() == 0
