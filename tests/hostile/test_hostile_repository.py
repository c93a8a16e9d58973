"""Hostile repository content that tests/lifecycle/test_bad_versions.py does not cover:
symlinks that lead out of the repository, and config.pbtxt values that are absurd rather than
unparsable. Each gets a per-model or per-version reason in ListModels; nothing crashes or hangs,
and the sound models keep serving.

Triton follows symlinks; bertstream refuses a version folder that is, or contains, a link
resolving outside the repository root (a repository an operator audits is all that is served),
and a config.pbtxt that links outside. Links that stay inside the repository are fine.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServerProcess

READY, UNKNOWN, UNAVAILABLE = (pb.VERSION_STATE_READY, pb.VERSION_STATE_UNKNOWN,
                               pb.VERSION_STATE_UNAVAILABLE)
OUTSIDE = "links outside the model repository (symlinks must stay inside it)"


def rows(address: str) -> dict[tuple[str, int], tuple[int, str]]:
    with grpc.insecure_channel(address) as channel:
        listed = pb_grpc.BertServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    return {(m.model, m.version): (m.state, m.reason) for m in listed.models}


def embed(address: str, model: str, version: int = 0) -> pb.EmbedResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model=model, version=version, texts=["今天股市大涨"]), timeout=30)


def check_log(server: ServerProcess) -> None:
    log = "".join(server.lines)
    assert server.stop() == 0, log[-4000:]
    assert "Traceback" not in log, log


def test_symlinks_out_of_the_repository_are_refused(
    model_repository: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
) -> None:
    repository = Path(shutil.copytree(model_repository, tmp_path / "repo"))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model_repository / "tiny-embed" / "1", elsewhere / "1")
    embed_dir, news_dir = repository / "tiny-embed", repository / "tiny-news"
    # tiny-embed: 1 real; 2 a link to a folder outside; 3 holds a link to a file outside.
    (embed_dir / "2").symlink_to(elsewhere / "1", target_is_directory=True)
    shutil.copytree(embed_dir / "1", embed_dir / "3")
    (embed_dir / "3" / "model.onnx").unlink()
    (embed_dir / "3" / "model.onnx").symlink_to(elsewhere / "1" / "model.onnx")
    # tiny-news: 2 is a link inside the repository (allowed); 3 has a link that loops, and a
    # relative link that climbs out; policy `all` tries every one.
    staging = news_dir / ".staging-2"
    shutil.copytree(news_dir / "1", staging)
    (news_dir / "2").symlink_to(staging, target_is_directory=True)
    shutil.copytree(news_dir / "1", news_dir / "3")
    (news_dir / "3" / "loop").symlink_to("loop")
    (news_dir / "3" / "secret").symlink_to("../../../../elsewhere/1/tokenizer.json")
    config = news_dir / "config.pbtxt"
    config.write_text(_policy("all {}")(config.read_text()))
    # A third model whose config.pbtxt is a link to a file outside the repository.
    linked = repository / "linked-config"
    shutil.copytree(embed_dir / "1", linked / "1")
    shutil.copy(embed_dir / "config.pbtxt", elsewhere / "config.pbtxt")
    (elsewhere / "config.pbtxt").write_text(
        (elsewhere / "config.pbtxt").read_text().replace('"tiny-embed"', '"linked-config"'))
    (linked / "config.pbtxt").symlink_to(elsewhere / "config.pbtxt")

    server = start_server(repository)
    seen = rows(server.address)
    state, reason = seen["tiny-embed", 2]
    assert state == UNAVAILABLE and f"the version folder itself {OUTSIDE}" in reason, reason
    state, reason = seen["tiny-embed", 3]
    assert state == UNAVAILABLE and f"refused: model.onnx {OUTSIDE}" in reason, reason
    assert seen["tiny-embed", 1][0] == READY, "the policy falls back to the sound version"
    assert embed(server.address, "tiny-embed").version == 1

    assert seen["tiny-news", 1][0] == READY and seen["tiny-news", 2][0] == READY
    state, reason = seen["tiny-news", 3]
    assert state == UNAVAILABLE and f"loop, secret {OUTSIDE}" in reason, reason
    assert embed(server.address, "tiny-news", 2).version == 2

    state, reason = seen["linked-config", 0]
    assert state == UNAVAILABLE and "config.pbtxt links outside the repository" in reason
    assert ("linked-config", 1) not in seen
    check_log(server)


def _hostile_config(source: Path, repository: Path, name: str, edit: Callable[[str], str]) -> None:
    folder = repository / name
    shutil.copytree(source / "1", folder / "1")
    text = (source / "config.pbtxt").read_text().replace(f'"{source.name}"', f'"{name}"')
    changed = edit(text)
    assert changed != text, name
    (folder / "config.pbtxt").write_text(changed)


def _set(field: str, value: int) -> Callable[[str], str]:
    return lambda text: re.sub(rf"^{field}: .*$", f"{field}: {value}", text, flags=re.M)


def _policy(body: str) -> Callable[[str], str]:
    return lambda text: re.sub(r"version_policy \{.*?\n\}\n", f"version_policy {{ {body} }}\n",
                               text, flags=re.S)


def _add(block: str) -> Callable[[str], str]:
    return lambda text: text + block + "\n"


def test_absurd_config_values_give_a_reason_per_model(
    model_repository: Path, tmp_path: Path, start_server: Callable[..., ServerProcess],
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny-news", repository / "tiny-news")
    source = model_repository / "tiny-embed"
    def batching(body: str) -> Callable[[str], str]:
        return lambda text: text.replace("dynamic_batching {\n}", f"dynamic_batching {{ {body} }}")

    def instances(body: str) -> Callable[[str], str]:
        return lambda text: re.sub(r"instance_group \{.*?\}", f"instance_group {{ {body} }}",
                                   text, flags=re.S)

    refused = {  # model -> words of its model-level reason
        "batch-negative": (_set("max_batch_size", -1), "max_batch_size must not be negative"),
        "delay-max": (batching("max_queue_delay_microseconds: 18446744073709551615"),
                      "max_queue_delay_microseconds 18446744073709551615 is over the limit"),
        "delay-hour": (batching("max_queue_delay_microseconds: 3600000000"),
                       "is over the limit of 10000000"),
        "tokens-negative": (batching("max_batch_tokens: -5"),
                            "max_batch_tokens must not be negative"),
        "queue-negative": (batching("max_queue_size: -1"), "max_queue_size must not be negative"),
        "instances-million": (instances("count: 1000000"),
                              "asks for 1000000 sessions per version, over the limit of 64"),
        "instances-negative": (instances("count: -3"), "count must not be negative"),
        "instances-many-groups": (_add("instance_group { count: 40 }\n"
                                       "instance_group { count: 40 }"), "asks for 81 sessions"),
        "sequence-billion": (_set("max_sequence_length", 10**9),
                             "max_sequence_length 1000000000 is over the limit of 65536"),
        "sequence-negative": (_set("max_sequence_length", -64),
                              "max_sequence_length must not be negative"),
        "layers-absurd": (_add(f"pooling_layers: {-2**31}\npooling_layers: 1000000"),
                          "pooling_layers [-2147483648, 1000000] are outside 1..2"),
        "policy-absurd": (_policy("specific { versions: -1 versions: 0 }"),
                          "specific versions must be positive"),
    }
    unavailable = {  # model -> words of its version-1 reason
        # The tiny graph has 512 positions: a config promising more fails its warm-up.
        "sequence-beyond-graph": (_set("max_sequence_length", 1000),
                                  "cannot run a text of max_sequence_length 1000 tokens"),
    }
    serving = {
        "batch-billion": _set("max_batch_size", 10**9),
        "instances-zero": instances("count: 0"),
        "queue-huge": batching(f"max_queue_size: {2**63 - 1} max_batch_tokens: {2**62}"),
        "delay-second": batching("max_queue_delay_microseconds: 300000"),
        "policy-latest-huge": _policy("latest { num_versions: 4294967295 }"),
        "sequence-at-graph": _set("max_sequence_length", 512),
    }
    for name, (edit, _) in {**refused, **unavailable}.items():
        _hostile_config(source, repository, name, edit)
    for name, edit in serving.items():
        _hostile_config(source, repository, name, edit)

    started = time.monotonic()
    server = start_server(repository, default_model="tiny-news")
    print(f"server ready after {time.monotonic() - started:.1f}s")
    seen = rows(server.address)
    for name, (_, words) in refused.items():
        state, reason = seen[name, 0]
        assert state == UNAVAILABLE and words in reason, (name, reason)
        assert not [key for key in seen if key[0] == name and key[1]], (name, seen)
    for name, (_, words) in unavailable.items():
        state, reason = seen[name, 1]
        assert state == UNAVAILABLE and words in reason, (name, reason)
    for name in (*serving, "tiny-news"):
        assert seen[name, 1][0] == READY, (name, seen[name, 1])
        response = embed(server.address, name)
        assert response.version == 1 and len(response.embeddings[0].values) == 64
    check_log(server)
