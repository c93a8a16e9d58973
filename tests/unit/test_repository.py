"""Names, version folders and version policies (pure), and scanning a folder."""

from pathlib import Path

import pytest
from bertstream.server.errors import InvalidInput
from bertstream.server.repository.folders import check_name, parse_version, scan, select_versions
from bertstream.v1.model_config_pb2 import ModelVersionPolicy


@pytest.mark.parametrize("name", ["news-zh", "rbt3", "a.b_c", "M1"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "/etc", "a/b", ".hidden", "..", "a..b", "x" * 200,
                                  "a\\b", "新闻", "a b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        check_name(name)


@pytest.mark.parametrize(("folder", "version"), [("1", 1), ("12", 12), ("01", None),
                                                 ("0", None), ("abc", None), ("-1", None),
                                                 ("１", None), (".tmp-2", None)])
def test_version_folders(folder: str, version: int | None) -> None:
    assert parse_version(folder) == version


def policy(**kw: object) -> ModelVersionPolicy:
    p = ModelVersionPolicy()
    if "latest" in kw:
        p.latest.num_versions = kw["latest"]  # type: ignore[assignment]
    if "all" in kw:
        p.all.SetInParent()
    if "specific" in kw:
        p.specific.versions.extend(kw["specific"])  # type: ignore[arg-type]
    return p


def test_policies() -> None:
    available = [3, 1, 7, 2]
    assert select_versions(policy(latest=1), available) == [7]
    assert select_versions(policy(latest=2), available) == [3, 7]
    assert select_versions(policy(all=True), available) == [1, 2, 3, 7]
    assert select_versions(policy(specific=[2, 9]), available) == [2]
    assert select_versions(ModelVersionPolicy(), available) == [7]
    assert select_versions(policy(latest=1), []) == []


def test_scan_keeps_broken_models_with_their_error(tmp_path: Path) -> None:
    good = tmp_path / "good"
    (good / "1").mkdir(parents=True)
    (good / "2").mkdir()
    (good / "01").mkdir()
    (good / ".tmp-3-abc").mkdir()
    (good / "config.pbtxt").write_text(
        'task: TASK_EMBED embedding_dimension: 8 num_layers: 1 max_sequence_length: 16')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("nonsense {")
    (tmp_path / ".staging").mkdir()
    (tmp_path / "outside").symlink_to("/tmp")
    entries = scan(tmp_path)
    assert set(entries) == {"good", "broken", "outside"}
    assert sorted(entries["good"].versions) == [1, 2]
    good = entries["good"]
    assert good.config is not None
    assert select_versions(good.config.version_policy, good.versions) == [2]
    assert entries["broken"].config is None and "does not parse" in entries["broken"].config_error
    assert "outside the repository" in entries["outside"].config_error
