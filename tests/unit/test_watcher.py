"""Stability of version folders: what poll mode waits for before it loads one."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bertstream.server.repository.config import ConfigError, load_with_digest
from bertstream.server.repository.watcher import StabilityTracker, fingerprint, missing_files
from bertstream.v1.model_config_pb2 import ModelConfig, Task


def test_a_fresh_folder_waits_one_quiet_period(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    tracker = StabilityTracker(quiet_s=5.0)
    assert not tracker.stable(tmp_path, now=100.0), "files just written"
    assert not tracker.stable(tmp_path, now=103.0)
    assert tracker.stable(tmp_path, now=105.5), "unchanged for the quiet period"
    (tmp_path / "model.onnx").write_bytes(b"x" * 11)
    assert not tracker.stable(tmp_path, now=106.0), "a change starts the wait again"
    assert tracker.stable(tmp_path, now=111.1)


def test_an_old_finished_folder_is_stable_at_first_look(tmp_path: Path) -> None:
    """A folder renamed into place long after its files were written loads at once. Old
    mtimes alone (cp -p, rsync -a) do not count: ctime says when the files really landed."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(path, (old, old))  # mtime an hour back; ctime is now
    assert not StabilityTracker(quiet_s=5.0).stable(tmp_path)
    assert StabilityTracker(quiet_s=0.0).stable(tmp_path)
    assert not StabilityTracker(quiet_s=0.0).stable(tmp_path / "empty-or-missing")


def test_fingerprint_sees_hidden_and_nested_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    before = fingerprint(tmp_path)
    (tmp_path / ".partial").write_text("in progress")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("2")
    names = [entry[0] for entry in fingerprint(tmp_path)]
    assert names == [".partial", "a", "sub/b"] and before != fingerprint(tmp_path)


def test_required_files_depend_on_the_task(tmp_path: Path) -> None:
    embed, classify = ModelConfig(task=Task.TASK_EMBED), ModelConfig(task=Task.TASK_CLASSIFY)
    assert missing_files(tmp_path, embed) == ["model.onnx", "tokenizer.json"]
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert missing_files(tmp_path, embed) == []
    assert missing_files(tmp_path, classify) == ["labels.txt"]


def test_an_openvino_ir_waits_for_its_weights(tmp_path: Path) -> None:
    """model.xml landed, model.bin not yet (a copy in progress): not loadable until it has."""
    embed = ModelConfig(task=Task.TASK_EMBED)
    for name in ("model.onnx", "tokenizer.json", "model.xml"):
        (tmp_path / name).write_bytes(b"")
    assert missing_files(tmp_path, embed) == ["model.bin"]
    (tmp_path / "model.bin").write_bytes(b"")
    assert missing_files(tmp_path, embed) == []


def test_config_digest_is_of_the_bytes_parsed(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    base = "task: TASK_EMBED embedding_dimension: 8 num_layers: 1\n"
    (folder / "config.pbtxt").write_text(base + "max_batch_size: 4\n")
    config, first = load_with_digest(folder)
    assert config.max_batch_size == 4 and len(first) == 64
    (folder / "config.pbtxt").write_text(base + "max_batch_size: 8\n")
    config, second = load_with_digest(folder)
    assert config.max_batch_size == 8 and second != first
    (folder / "config.pbtxt").write_text("max_batch_size: [\n")
    try:
        load_with_digest(folder)
        raise AssertionError("a broken config parsed")
    except ConfigError as error:
        assert "does not parse" in str(error)
