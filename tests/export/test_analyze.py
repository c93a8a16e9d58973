"""bertstream-analyze on the session's tiny-news: the probe grid, the pictures and their numbers.

tiny-news has random weights, so the texts are built from each label's own characters: even
random features separate them, and a probe whose features were paired with the wrong labels
(the length-sorted batches scattered back to the wrong rows) would fall to chance.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bertstream.export.analyze import PROBED_POOLINGS, VersionOutputs, main, resolve_version
from bertstream.export.training import EncoderFeatures

# tiny-news's labels, in another order than its logits: the shipped head is scored anyway.
TOPICS = {
    "negative": "暴雨台风灾害事故", "neutral": "会议通知报告发布", "positive": "冠军获奖喜讯夺金",
}
LIMIT = 40


def _write(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        label = list(TOPICS)[i % len(TOPICS)]
        text = "".join(rng.choice(list(TOPICS[label]), size=rng.integers(4, 12)))
        lines.append(json.dumps({"text": text, "label": label}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def analyzed(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("analyze")
    train = _write(folder / "train.jsonl", 90, seed=1)
    dev, test = _write(folder / "dev.jsonl", 45, seed=2), _write(folder / "test.jsonl", 45, seed=3)
    output = folder / "img"
    argv = ["--version", str(model_repository / "tiny-news"), "--data", str(train),
            "--dev", str(dev), "--test", str(test), "--output", str(output),
            "--limit", str(LIMIT), "--engine", "onnxruntime"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((output / "tiny-news-probe.json").read_text("utf-8")), output


def test_probe_grid_covers_every_exported_output(analyzed: tuple[dict, Path]) -> None:
    record, _ = analyzed
    assert record["poolings"] == ["mean", "max", "cls", "mean_max"] == list(PROBED_POOLINGS)
    assert record["layers"] == [1, 2]
    assert record["data"]["sizes"] == {"train": LIMIT, "dev": LIMIT, "test": LIMIT}
    assert set(record["cells"]) == {f"{p}_layer{n}" for p in PROBED_POOLINGS for n in (1, 2)}
    for metric in ("accuracy", "macro_f1"):
        assert np.array(record[metric]).shape == (4, 2)
        for i, pooling in enumerate(record["poolings"]):
            for j, layer in enumerate(record["layers"]):
                assert record[metric][i][j] == record["cells"][f"{pooling}_layer{layer}"][
                    "test"][metric]
    best = record["best"]
    assert best["accuracy"] == np.max(record["accuracy"])
    assert record["cells"][best["output"]]["test"]["n"] == LIMIT
    # Separable by construction: the probe must beat the majority class by far.
    assert best["accuracy"] >= 0.8 > record["majority_baseline"], record["accuracy"]
    assert record["head"]["n"] == LIMIT and set(record["head"]["f1"]) == set(TOPICS)
    assert record["engine"] == "CPUExecutionProvider"
    assert record["map"]["output"] == "mean_layer2"  # tiny-news's default pooling and layer
    assert len(record["map"]["pca_explained"]) == 2


def test_pictures_are_written(analyzed: tuple[dict, Path]) -> None:
    record, output = analyzed
    assert record["figures"] == {"probe": "tiny-news-probe.png", "map": "tiny-news-map.png"}
    for name in record["figures"].values():
        width, height = _png_size(output / name)
        assert 300 <= width <= 1600 and 300 <= height <= 1000, (name, width, height)


def test_features_are_the_servers(model_dir: Callable[..., Path]) -> None:
    """All outputs in one pass give what bertstream-train-head's features give, output by
    output, in the texts' own order."""
    version = model_dir("tiny-news")
    texts = ["今天股市大涨", "暴雨", "冠军获奖喜讯夺金" * 20, "会议通知"]
    outputs = VersionOutputs(version, "onnxruntime", threads=1)(texts, with_logits=False)
    single = EncoderFeatures(version, engine="onnxruntime", threads=1)
    for pooling in ("mean", "cls"):
        np.testing.assert_allclose(outputs[f"{pooling}_layer2"], single(texts, pooling),
                                   rtol=1e-5, atol=1e-6)


def test_a_model_folder_means_its_highest_version(model_repository: Path) -> None:
    assert resolve_version(model_repository / "tiny-news") == model_repository / "tiny-news" / "1"
    version = model_repository / "tiny-news" / "1"
    assert resolve_version(version) == version
