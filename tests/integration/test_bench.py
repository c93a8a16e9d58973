"""benchmarks/bench.py runs end to end (tiny model, fake device, a few hundred texts) and
records the stage budget: the script README's Speed section is made with must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pytest import approx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from stage_budget import STAGES, Snapshot, budget, summary  # noqa: E402


def test_budget_splits_each_thread_into_its_stages_and_a_rest() -> None:
    before = Snapshot({s: 0.0 for s in STAGES}, {"event-loop": 1.0, "tokenize": 0.0}, 10.0)
    after = Snapshot({**{s: 0.0 for s in STAGES}, "validate": 0.001, "respond": 0.002,
                      "tokenize_native": 0.05},
                     {"event-loop": 1.01, "tokenize": 0.06}, 10.08)
    rows = {row.stage: row for row in budget(before, after, 1000)}
    assert rows["validate"].us_per_text == approx(1.0) and rows["validate"].serial
    assert rows["event-loop:rest"].us_per_text == approx(10.0 - 3.0)
    assert rows["tokenize_native"].us_per_text == approx(50.0)
    assert not rows["tokenize_native"].serial
    assert rows["tokenize:rest"].us_per_text == approx(10.0)
    assert rows["unattributed"].us_per_text == approx(10.0)  # 80 us in all, 70 on threads
    totals = summary(list(rows.values()), before, after, 1000, cores=2)
    assert totals["server_cpu_us_per_text"] == approx(80.0)
    assert totals["event_loop_us_per_text"] == approx(10.0)


def test_bench_runs_with_the_fake_device_and_records_the_budget(
        model_repository: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model-repository",
         str(model_repository), "--model", "tiny-embed", "--texts", "256", "--feeds", "1",
         "--per-message", "16", "--latency-runs", "5", "--unary-texts", "32",
         "--fake-device", "h100-e5-small-fp16", "--output", str(output)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage budget, streams of 16 texts per message" in done.stdout
    record = json.loads(output.read_text())
    assert record["device"] == "fake: h100-e5-small-fp16"
    figures = record["figures"]
    for name in ("service_stream_texts_per_s", "service_unary_texts_per_s",
                 "stream_event_loop_us_per_text", "stream_server_cpu_vs_tokenizer",
                 "service_stream_device_busy", "tokenizer_alone_cpu_us_per_text"):
        assert figures[name] > 0, name
    stages = {row["stage"] for row in record["stage_budget"]["stream"]}
    assert {"tokenize_native", "device", "respond", "event-loop:rest"} <= stages
