"""Bad versions never replace good ones and say why; half-copied folders are never served;
names are checked; a config.pbtxt change reloads safely; released sessions free memory."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from bertstream.client.cli import main as cli
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from bertstream.v1 import model_config_pb2
from swaplib import MODEL, Load, list_models, make_repository, publish, wait_for

if TYPE_CHECKING:
    from conftest import ServerProcess

READY, UNKNOWN, UNAVAILABLE = (pb.VERSION_STATE_READY, pb.VERSION_STATE_UNKNOWN,
                               pb.VERSION_STATE_UNAVAILABLE)


def _broken(staged: Path, tmp_path: Path, name: str, model: str = MODEL) -> Path:
    folder = tmp_path / name
    shutil.copytree(staged / model / "1", folder)
    return folder


def test_each_bad_version_is_reported_and_the_good_one_serves(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
    make_tiny_options: Callable[..., Any], capsys: pytest.CaptureFixture[str],
) -> None:
    from bertstream.export import export_model

    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1], "news": [1]})
    narrow = tmp_path / "narrow"
    export_model(make_tiny_options(MODEL, narrow, hidden_size=32, num_heads=2,
                                   intermediate_size=64))
    cases: list[tuple[Path, str, int, str]] = []  # folder, model, state, words in the reason

    corrupt = _broken(staged, tmp_path, "corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x00garbage")
    cases.append((corrupt, MODEL, UNAVAILABLE, "onnxruntime cannot load model.onnx"))
    no_tokenizer = _broken(staged, tmp_path, "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    cases.append((no_tokenizer, MODEL, UNKNOWN, "tokenizer.json missing"))
    bad_tokenizer = _broken(staged, tmp_path, "bad-tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    cases.append((bad_tokenizer, MODEL, UNAVAILABLE, "tokenizer.json is not a valid tokenizer"))
    cases.append((narrow / MODEL / "1", MODEL, UNAVAILABLE, "has size 32, config.pbtxt says 64"))
    bad_labels = _broken(staged, tmp_path, "bad-labels", model="news")
    (bad_labels / "labels.txt").write_text("positive\nneutral\nnegative\n")
    cases.append((bad_labels, "news", UNAVAILABLE, "labels.txt has 3 labels, config.pbtxt says 2"))

    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "*",
                          default_model=MODEL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        for version, (folder, model, state, words) in enumerate(cases, start=2):
            publish(folder, repository / model, version)
            response = stub.LoadModel(pb.LoadModelRequest(model=model), timeout=60)
            rows = {s.version: s for s in response.versions}
            assert rows[version].state == state and words in rows[version].reason, rows[version]
            assert rows[1].state == READY, "the good version keeps serving"
            answer = stub.Embed(pb.EmbedRequest(model=model, texts=["新闻"]), timeout=10)
            assert answer.version == 1

        # A config.pbtxt that does not parse: a model-level row, version 1 still serving.
        config = repository / MODEL / "config.pbtxt"
        good_config = config.read_text(encoding="utf-8")
        config.write_text("max_batch_size: [not a number\n", encoding="utf-8")
        with pytest.raises(grpc.RpcError) as error:
            stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rows = list_models(server.address)
        assert "does not parse" in rows[(MODEL, 0)][1] and rows[(MODEL, 1)][0] == READY
        assert stub.Embed(pb.EmbedRequest(model=MODEL, texts=["新闻"]), timeout=10).version == 1

        # A config change reloads version 1 with it, beside the serving one.
        config.write_text(good_config.replace("POOLING_MEAN", "POOLING_CLS"), encoding="utf-8")
        stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        answer = stub.Embed(pb.EmbedRequest(model=MODEL, texts=["新闻"]), timeout=10)
        assert (answer.version, answer.pooling) == (1, model_config_pb2.POOLING_CLS)
        assert (MODEL, 0) not in list_models(server.address), "the model-level error cleared"

        # Names from requests never reach the filesystem unchecked.
        for name, code in (("../x", grpc.StatusCode.INVALID_ARGUMENT),
                           ("/etc", grpc.StatusCode.INVALID_ARGUMENT),
                           ("a/../../b", grpc.StatusCode.INVALID_ARGUMENT),
                           ("missing", grpc.StatusCode.NOT_FOUND)):
            for call, request in ((stub.LoadModel, pb.LoadModelRequest(model=name)),
                                  (stub.UnloadModel, pb.UnloadModelRequest(model=name))):
                with pytest.raises(grpc.RpcError) as error:
                    call(request, timeout=10)
                assert error.value.code() == code, (name, error.value.details())
    # The CLI speaks the same rpcs.
    cli(["load", "news", "--server", server.address])
    rows = json.loads(capsys.readouterr().out)
    assert {(r["version"], r["state"]) for r in rows} >= {(1, "READY"), (6, "UNAVAILABLE")}
    cli(["models", "--model", "news", "--server", server.address])
    assert {r["model"] for r in json.loads(capsys.readouterr().out)} == {"news"}
    log = "".join(server.lines)
    assert server.stop() == 0
    assert "Traceback" not in log


def test_a_corrupt_openvino_ir_is_isolated_like_a_corrupt_onnx(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
) -> None:
    """A version folder with an IR pair (bertstream-export --variant openvino) under backend
    "openvino": a truncated model.bin or a garbage model.xml leaves that version UNAVAILABLE
    with the IR named in its reason, and the good IR version keeps serving."""
    pytest.importorskip("openvino")
    from bertstream.export.openvino_ir import make_ir

    repository = make_repository(staged, tmp_path / "repo", {MODEL: []})
    config = repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text("utf-8") + 'backend: "openvino"\n', "utf-8")
    good = _broken(staged, tmp_path, "good-ir")
    make_ir(good, "openvino")
    publish(good, repository / MODEL, 1)
    truncated = _broken(staged, tmp_path, "truncated-bin")
    make_ir(truncated, "openvino")
    weights = (truncated / "model.bin").read_bytes()
    (truncated / "model.bin").write_bytes(weights[: len(weights) // 2])
    garbage = _broken(staged, tmp_path, "garbage-xml")
    make_ir(garbage, "openvino")
    (garbage / "model.xml").write_bytes(b"<net>\x00not an IR")

    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "*",
                          default_model=MODEL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(model=MODEL), timeout=10)
        assert info.execution_provider.startswith("OpenVINO CPU"), info.execution_provider
        for version, folder in enumerate((truncated, garbage), start=2):
            publish(folder, repository / MODEL, version)
            response = stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
            rows = {s.version: s for s in response.versions}
            assert rows[version].state == UNAVAILABLE, rows[version]
            assert "openvino cannot load model.xml" in rows[version].reason, rows[version]
            assert rows[1].state == READY, "the good version keeps serving"
            answer = stub.Embed(pb.EmbedRequest(model=MODEL, texts=["新闻"]), timeout=10)
            assert answer.version == 1
    log = "".join(server.lines)
    assert server.stop() == 0
    assert "Traceback" not in log


def _copy_slowly(source: Path, target: Path, pause: float) -> None:
    """Straight into the version folder, file by file, big files in chunks: what the operator
    guide says not to do."""
    target.mkdir()
    for index, path in enumerate(sorted(source.iterdir())):
        if index:
            time.sleep(pause)
        with open(path, "rb") as src, open(target / path.name, "wb") as dst:
            while chunk := src.read(256 * 1024):
                dst.write(chunk)
                dst.flush()
                time.sleep(pause / 4)


def test_a_folder_copied_slowly_is_served_only_when_complete(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    server = start_server(repository, "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.3", default_model=MODEL)
    load = Load(server.address).start(unary=1, streams=1)
    try:
        copier_done = []
        import threading

        def copy() -> None:
            _copy_slowly(staged / MODEL / "2", repository / MODEL / "2", pause=1.0)
            copier_done.append(time.monotonic())

        thread = threading.Thread(target=copy)
        thread.start()
        looks = []  # (time the ListModels call started, state, reason)
        while thread.is_alive():
            asked = time.monotonic()
            state = list_models(server.address).get((MODEL, 2), (None, ""))
            looks.append((asked, *state))
            time.sleep(0.1)
        done = copier_done[0]
        early = [look for look in looks if look[0] < done and look[1] == READY]
        assert not early, f"version 2 READY while still being copied: {early[:3]}"
        seen_waiting = any(s == UNKNOWN and "waiting" in r for _, s, r in looks)
        first = wait_for(lambda: next((a for a in list(load.answers) if a.version == 2), None),
                         30, "version 2 to serve once complete")
    finally:
        answers = load.stop()
    assert first.at > done, "served before the copy finished"
    assert not [a.error for a in answers if a.error]
    assert seen_waiting, "ListModels showed the half-copied version as waiting"
    log = "".join(server.lines)
    assert server.stop() == 0
    assert "version 2: load failed" not in log, "a half-copied folder was never even tried"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc for RSS")
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_memory_is_flat_over_20_swaps(
    tmp_path: Path, start_server: Callable[..., ServerProcess],
    make_tiny_options: Callable[..., Any], engine: str,
) -> None:
    """Each swap loads a ~25 MB session and releases the old one: after 20 swaps resident
    memory is within 10 % of its level after the first, on either CPU engine."""
    if engine == "openvino":
        pytest.importorskip("openvino")
    from bertstream.export import export_model

    staged = tmp_path / "staged"
    export_model(make_tiny_options("big", staged, hidden_size=256, num_heads=4,
                                   intermediate_size=512))
    repository = tmp_path / "repo"
    (repository / "big").mkdir(parents=True)
    shutil.copy(staged / "big" / "config.pbtxt", repository / "big" / "config.pbtxt")
    publish(staged / "big" / "1", repository / "big", 1)
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "big",
                          "--cpu-engine", engine, default_model="big")
    pid = server.proc.pid
    levels = []
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        for version in range(2, 23):
            publish(staged / "big" / "1", repository / "big", version)
            stub.LoadModel(pb.LoadModelRequest(model="big"), timeout=60)
            for _ in range(5):
                assert stub.Embed(pb.EmbedRequest(texts=["内存"]), timeout=10).version == version
            shutil.rmtree(repository / "big" / str(version - 1))
            wait_for(lambda v=version: list_models(server.address).get(("big", v - 1), (0,))[0]
                     in (0, UNAVAILABLE), 30, "the old version to be released")
            time.sleep(0.2)
            levels.append(_rss_mib(pid))
    first, last = levels[0], levels[-1]
    print(f"RSS after swap 1: {first:.1f} MiB, after swap 20: {last:.1f} MiB, "
          f"max {max(levels):.1f} MiB")
    assert last <= first * 1.10, levels
    assert server.stop() == 0
    assert os.path.exists(repository / "big" / "22")


def test_config_fixed_after_a_failure_and_config_first_rollout(
    staged: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
    make_tiny_options: Callable[..., Any],
) -> None:
    """A version that failed because of config.pbtxt loads once the config is fixed; and a
    config change the serving version cannot take waits for a version that can."""
    from bertstream.export import export_model

    narrow = tmp_path / "narrow"
    export_model(make_tiny_options(MODEL, narrow, hidden_size=32, num_heads=2,
                                   intermediate_size=64))
    repository = make_repository(staged, tmp_path / "repo", {MODEL: [1]})
    config = repository / MODEL / "config.pbtxt"
    good = config.read_text(encoding="utf-8")
    wide_to_narrow = good.replace("embedding_dimension: 64", "embedding_dimension: 32")
    assert wide_to_narrow != good
    config.write_text(wide_to_narrow, encoding="utf-8")
    server = start_server(repository, "--model-control-mode", "explicit", default_model=MODEL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "config.pbtxt says 32" in error.value.details()
        config.write_text(good, encoding="utf-8")  # fixed: version 1 itself is unchanged
        response = stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        assert {s.version: s.state for s in response.versions}[1] == READY

        # Config first: version 1 cannot take it, so it keeps serving with the old config...
        config.write_text(wide_to_narrow, encoding="utf-8")
        with pytest.raises(grpc.RpcError) as error:
            stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        assert "still serving the previous config" in error.value.details()
        assert stub.Embed(pb.EmbedRequest(texts=["新闻"]), timeout=10).version == 1
        # ...then the version made for it arrives, and the change goes through.
        publish(narrow / MODEL / "1", repository / MODEL, 2)
        stub.LoadModel(pb.LoadModelRequest(model=MODEL), timeout=60)
        answer = stub.Embed(pb.EmbedRequest(texts=["新闻"]), timeout=10)
        assert answer.version == 2 and len(answer.embeddings[0].values) == 32
    assert server.stop() == 0
