"""The repository writer: names, version numbers, atomic publish, config.pbtxt agreement.

Mostly with fake builders (no export), plus the refusals the CLI makes before exporting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from bertstream.export import (
    ConfigFields,
    ConfigMismatchError,
    PublishError,
    VersionExistsError,
    build_model_config,
    next_version,
    plan_version,
    publish_version,
    validate_model_name,
)
from bertstream.export.cli import main
from bertstream.export.model_config import read_model_config

FIELDS = ConfigFields(
    name="news",
    num_layers=2,
    embedding_dimension=64,
    max_sequence_length=64,
    pooling_layers=(1, 2),
)


def _write_marker(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"graph")


def _fail(folder: Path) -> None:
    _write_marker(folder)
    raise RuntimeError("verification failed")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["news", "news-zh", "rbt3_v2", "a.b", "A1", "_x", "9"])
def test_valid_model_names(name: str) -> None:
    assert validate_model_name(name) == name


BAD_NAMES = ["", ".", "..", ".hidden", ".tmp-1-ab", "a/b", "/abs", "../up", "a\\b", "a b", "新闻"]


@pytest.mark.parametrize("name", [*BAD_NAMES, "x" * 129])
def test_invalid_model_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(PublishError, match="invalid model name"):
        validate_model_name(name)
    with pytest.raises(PublishError):
        plan_version(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_next_version_counts_canonical_folders_only(tmp_path: Path) -> None:
    assert next_version(tmp_path / "missing") == 1
    for name in ("1", "2", "7", "01", "abc", ".tmp-9-abcd", "-3"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert next_version(tmp_path) == 8
    assert plan_version(tmp_path.parent, tmp_path.name).version == 8


@pytest.mark.parametrize("version", [0, -1, True])
def test_versions_must_be_positive_integers(tmp_path: Path, version: int) -> None:
    with pytest.raises(PublishError, match="positive integer"):
        plan_version(tmp_path, "news", version)


def test_publish_new_model_writes_config_and_version(tmp_path: Path) -> None:
    config = build_model_config(FIELDS)
    target = publish_version(plan_version(tmp_path, "news"), _write_marker, config=config)
    assert target == tmp_path / "news" / "1"
    assert sorted(p.name for p in (tmp_path / "news").iterdir()) == ["1", "config.pbtxt"]
    assert read_model_config(tmp_path / "news") == config
    assert oct(target.stat().st_mode & 0o777) != oct(0o700), "readable by a server user"
    second = publish_version(plan_version(tmp_path, "news"), _write_marker, config=config)
    assert second.name == "2"


def test_failed_build_publishes_nothing(tmp_path: Path) -> None:
    config = build_model_config(FIELDS)
    with pytest.raises(RuntimeError, match="verification failed"):
        publish_version(plan_version(tmp_path, "news"), _fail, config=config)
    assert list(tmp_path.iterdir()) == [], "no model folder, config or temp folder left"


def test_failed_build_keeps_existing_model_untouched(tmp_path: Path) -> None:
    config = build_model_config(FIELDS)
    publish_version(plan_version(tmp_path, "news"), _write_marker, config=config)
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        publish_version(plan_version(tmp_path, "news"), _fail, config=config)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "news").iterdir()) == ["1", "config.pbtxt"]


def test_refuses_to_overwrite_a_version(tmp_path: Path) -> None:
    publish_version(plan_version(tmp_path, "news"), _write_marker)
    with pytest.raises(VersionExistsError, match="never overwritten"):
        plan_version(tmp_path, "news", 1)
    plan = plan_version(tmp_path, "news", 2)
    (tmp_path / "news" / "2").mkdir()  # another exporter won the race
    (tmp_path / "news" / "2" / "model.onnx").write_bytes(b"theirs")
    with pytest.raises(VersionExistsError):
        publish_version(plan, _write_marker)
    assert (tmp_path / "news" / "2" / "model.onnx").read_bytes() == b"theirs"
    assert not [p for p in (tmp_path / "news").iterdir() if p.name.startswith(".")]


def test_contradicting_config_is_refused_before_building(tmp_path: Path) -> None:
    publish_version(plan_version(tmp_path, "news"), _write_marker, build_model_config(FIELDS))
    wider = ConfigFields(
        name="news",
        num_layers=3,
        embedding_dimension=128,
        max_sequence_length=64,
        pooling_layers=(3,),
        labels=("a", "b"),
    )
    built: list[Path] = []
    with pytest.raises(ConfigMismatchError) as error:
        publish_version(plan_version(tmp_path, "news"), built.append, build_model_config(wider))
    message = str(error.value)
    for field in ("task", "embedding_dimension", "num_labels", "num_layers", "pooling_layers"):
        assert field in message
    assert "TASK_EMBED" in message and "TASK_CLASSIFY" in message
    assert built == [] and next_version(tmp_path / "news") == 2


def test_cli_refuses_existing_version_before_exporting(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = os.stat(model_repository / "tiny-embed" / "1").st_mtime_ns
    argv = ["--model", "tiny-embed", "--model-repository", str(model_repository), "--version", "1"]
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.stat(model_repository / "tiny-embed" / "1").st_mtime_ns == before


def test_cli_refuses_bad_model_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "../escape", "--model-repository", str(tmp_path)]) == 1
    assert "invalid model name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_next_version_of_a_published_model(model_repository: Path, tmp_path: Path) -> None:
    repository = Path(shutil.copytree(model_repository, tmp_path / "repo"))
    existing = read_model_config(repository / "tiny-embed")
    assert existing is not None
    plan = plan_version(repository, "tiny-embed")
    assert plan.version == 2
    target = publish_version(plan, _write_marker, config=existing)
    assert target == repository / "tiny-embed" / "2"
    assert read_model_config(repository / "tiny-embed") == existing
