"""The hub path (`--source hfl/rbt3`), exercised offline: a Hugging Face cache laid out as the
hub leaves it, read with HF_HUB_OFFLINE=1, and the files a BERT-wwm hub repository holds
(vocab.txt and tokenizer_config.json, no tokenizer.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bertstream.export import RandomShape, random_checkpoint
from tokenizers import Tokenizer
from transformers import BertTokenizerFast

HUB_ID = "hfl/rbt3"
SHAPE = RandomShape(
    num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=40
)
NEWS = ["央行宣布降准，股市应声大涨！", "苹果发布iPhone 15，售价5999元", "《人民日报》评论"]


def _hub_repository_files(folder: Path) -> Path:
    """What hfl's repositories hold: config, weights, vocab.txt and a BertTokenizer config."""
    checkpoint = random_checkpoint(SHAPE)
    checkpoint.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()  # built from vocab.txt, as for hfl/chinese-bert-wwm
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 40}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _hub_cache(home: Path, repo_id: str) -> Path:
    """HF_HOME/hub/models--org--name/{refs/main, snapshots/<commit>/...}: the hub's cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    _hub_repository_files(cache / "snapshots" / commit)
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit, encoding="utf-8")
    return cache


def _export(source: str, repository: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bertstream.export.cli", "--source", source,
           "--model-repository", str(repository), "--model", "rbt3", "--labels", "体育,财经"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_export_from_the_hub_cache_offline(tmp_path: Path) -> None:
    home = tmp_path / "hf_home"
    _hub_cache(home, HUB_ID)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = _export(HUB_ID, tmp_path / "repository", env)
    assert result.returncode == 0, result.stderr
    version = tmp_path / "repository" / "rbt3" / "1"
    record = json.loads((version / "export.json").read_text(encoding="utf-8"))
    assert (record["source"], record["source_kind"]) == (HUB_ID, "hub")
    assert max(record["parity"]["max_abs_diff"].values()) <= 1e-4

    # The published tokenizer.json is BERT-wwm's WordPiece built from vocab.txt.
    snapshot = next((home / "hub").glob("models--*/snapshots/*"))
    expected = BertTokenizerFast.from_pretrained(snapshot)  # from vocab.txt
    published = Tokenizer.from_file(str(version / "tokenizer.json"))
    for text in NEWS:
        assert published.encode(text).ids == expected(text)["input_ids"]


def test_unknown_hub_id_offline_is_one_clean_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = _export(HUB_ID, tmp_path / "repository", env)
    assert result.returncode == 1
    assert "bertstream-export: error:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "repository" / "rbt3").exists()


@pytest.mark.parametrize("layout", ["with tokenizer.json", "vocab.txt only"])
def test_local_folder_in_hub_layout(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "rbt3"
    if layout == "vocab.txt only":
        _hub_repository_files(folder)
    else:
        random_checkpoint(SHAPE).save_pretrained(folder)
    result = _export(str(folder), tmp_path / "repository", dict(os.environ))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "repository/rbt3/1/export.json").read_text("utf-8"))
    assert record["source_kind"] == "folder" and record["vocab_size"] > 21000
