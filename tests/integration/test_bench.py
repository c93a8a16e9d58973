"""benchmarks/bench.py runs end to end (tiny model, fake device, a few hundred texts) and
records the stage budget, for gRPC streams, unary calls and HTTP /v1/embeddings: the script
README's Speed section is made with must not rot. So does benchmarks/mixed.py (interactive
calls beside bulk feeds), on its own and as bench.py --mixed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pytest import approx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from stage_budget import STAGES, Part, Snapshot, budget, summary  # noqa: E402


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


def test_budget_of_several_processes_sums_them_and_keeps_each_kind() -> None:
    """Engine and two front ends: rows sum every process per text of the server; a serial
    row's ceiling is its slowest kind's (two front ends: twice one); the summary has the
    engine's and the front ends' own event loop, serial time and ceilings."""
    def part(loop: float, cpu: float, texts: float, **stages: float) -> Part:
        return Part({**dict.fromkeys(STAGES, 0.0), **stages}, {"event-loop": loop}, cpu,
                    texts)

    zero = {name: part(0.0, 0.0, 0.0) for name in ("engine", "frontend-0", "frontend-1")}
    before = Snapshot({}, {}, 0.0, {**zero, "supervisor": Part(cpu_s=0.0)})
    after = Snapshot(dict.fromkeys(STAGES, 0.0), {}, 0.0, {
        "supervisor": Part(cpu_s=0.001),
        "engine": part(0.004, 0.005, 0.0, batch=0.001),  # 4 us of loop per text, 1 of batch
        "frontend-0": part(0.006, 0.006, 600.0, validate=0.002),  # 10 us per own text
        "frontend-1": part(0.004, 0.004, 400.0, validate=0.001)})
    after.stages.update(batch=0.001, validate=0.003)
    rows = {row.stage: row for row in budget(before, after, 1000)}
    assert rows["event-loop:rest"].us_per_text == approx(3.0 + 4.0 + 3.0)
    assert rows["event-loop:rest"].by_kind == approx({"engine": 3.0, "frontend": 7.0})
    assert rows["validate"].ceiling == approx(2 * 1e6 / 3.0)  # two front ends, 3 us together
    assert rows["batch"].ceiling == approx(1e6 / 1.0)  # the engine alone
    assert rows["supervisor"].us_per_text == approx(1.0)
    totals = summary(list(rows.values()), before, after, 1000, cores=2, elapsed_s=0.1)
    assert totals["engine_event_loop_us_per_text"] == approx(4.0)
    assert totals["engine_ceiling_texts_per_s"] == approx(1e6 / 4.0)
    assert totals["frontends_event_loop_us_per_text"] == approx(10.0)
    assert totals["busiest_frontend_event_loop_us_per_text"] == approx(10.0)
    assert totals["busiest_frontend_event_loop_busy"] == approx(0.06)
    assert totals["frontend_ceiling_texts_per_s"] == approx(1e5)
    assert totals["frontends_ceiling_texts_per_s"] == approx(2e5)
    assert totals["ceiling_serial_texts_per_s"] == approx(2e5)  # the front ends bound it


def test_bench_runs_with_the_fake_device_and_records_the_budget(
        model_repository: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model-repository",
         str(model_repository), "--model", "tiny-embed", "--texts", "256", "--feeds", "1",
         "--per-message", "16", "--latency-runs", "5", "--unary-texts", "32",
         "--fake-device", "h100-e5-small-fp16", "--output", str(output),
         "--mixed", "--mixed-texts", "64", "--interactive-seconds", "0.5"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage budget, streams of 16 texts per message" in done.stdout
    assert "mixed: interactive calls beside 1 feeds of 64 texts" in done.stdout
    assert "stage budget, HTTP POST /v1/embeddings of 16 texts (1 feeds x 8 connections)" \
        in done.stdout
    record = json.loads(output.read_text())
    assert record["device"] == "fake: h100-e5-small-fp16"
    figures = record["figures"]
    for name in ("service_stream_texts_per_s", "service_unary_texts_per_s",
                 "stream_event_loop_us_per_text", "stream_server_cpu_vs_tokenizer",
                 "service_stream_device_busy", "tokenizer_alone_cpu_us_per_text",
                 "service_http_texts_per_s", "http_vs_stream", "http_server_cpu_us_per_text",
                 "service_http_device_busy", "http_texts_cut"):
        assert figures[name] > 0, name
    stages = {row["stage"] for row in record["stage_budget"]["stream"]}
    assert {"tokenize_native", "device", "respond", "event-loop:rest"} <= stages
    stages = {row["stage"] for row in record["stage_budget"]["http"]}
    assert {"tokenize_native", "device", "event-loop:rest"} <= stages
    assert record["mixed"]["interactive_mixed_calls"] >= 1
    assert record["mixed"]["feeds_mixed_texts_per_s"] > 0


def test_mixed_measures_interactive_calls_beside_feeds(
        model_repository: Path, tmp_path: Path) -> None:
    """mixed.py: interactive calls alone, two feeds alone, then both; every figure recorded
    with the machine and settings."""
    output = tmp_path / "mixed.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mixed.py"), "--model-repository",
         str(model_repository), "--model", "tiny-embed", "--fake-device", "h100-e5-small-fp16",
         "--mixed-feeds", "2", "--mixed-texts", "256", "--per-message", "16",
         "--interactive-seconds", "1", "--interactive-interval", "0.05",
         "--output", str(output)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "interactive alone" in done.stdout and "feeds alone" in done.stdout
    record = json.loads(output.read_text())
    assert record["device"] == "fake: h100-e5-small-fp16"
    assert record["cpu_count"] >= 1 and record["model"] == "tiny-embed"
    assert record["settings"]["mixed_feeds"] == 2
    assert record["settings"]["fake_device"] == "h100-e5-small-fp16"
    figures = record["figures"]
    assert figures["interactive_alone_calls"] >= 5
    assert figures["interactive_mixed_calls"] >= 1
    assert figures["interactive_alone_failed"] == figures["interactive_mixed_failed"] == 0
    for phase in ("interactive_alone", "interactive_mixed"):
        assert 0 < figures[f"{phase}_p50_ms"] <= figures[f"{phase}_p99_ms"] \
            <= figures[f"{phase}_max_ms"], phase
    for phase in ("feeds_alone", "feeds_mixed"):
        assert figures[f"{phase}_texts_per_s"] > 0
        for feed in (0, 1):
            assert figures[f"{phase}_{feed}_texts_per_s"] > 0
            assert figures[f"{phase}_{feed}_elapsed_s"] > 0
        assert figures[f"{phase}_slowest_vs_fastest"] >= 1
    assert figures["feed_throughput_mixed_vs_alone"] > 0
    assert "interactive_p99_added_ms" in figures


def test_bench_measures_a_server_of_front_ends(model_repository: Path, tmp_path: Path) -> None:
    """--frontends 2: the server runs as a supervisor, an engine and two front ends; each
    feed's connection lands on its own front end and the JSON has the per-process view."""
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model-repository",
         str(model_repository), "--model", "tiny-embed", "--texts", "128", "--feeds", "2",
         "--per-message", "16", "--latency-runs", "3", "--unary-texts", "32",
         "--fake-device", "h100-e5-small-fp16", "--frontends", "2", "--output", str(output)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "processes, streams:" in done.stdout and "processes, unary:" in done.stdout
    assert "processes, HTTP:" in done.stdout
    record = json.loads(output.read_text())
    processes = record["processes"]
    assert processes["frontends"] == 2 and processes["placement"] == "even"
    for phase, texts in (("stream", 128), ("unary", 32), ("http", 128)):
        view = processes[phase]
        assert view["texts_by_process"] == {"frontend-0": texts // 2, "frontend-1": texts // 2}
        assert {p["process"] for p in view["processes"]} == {
            "supervisor", "engine", "frontend-0", "frontend-1"}
        assert view["bound_by"] in ("engine", "frontends")
        figures = record["figures"]
        for name in ("engine_event_loop_us_per_text", "engine_ceiling_texts_per_s",
                     "frontends_event_loop_us_per_text", "frontends_ceiling_texts_per_s",
                     "busiest_frontend_event_loop_us_per_text", "frontend_ceiling_texts_per_s",
                     "server_cpu_us_per_text"):
            assert figures[f"{phase}_{name}"] > 0, f"{phase}_{name}"
        assert figures[f"{phase}_frontends_answering"] == 2
    rows = {row["stage"]: row for row in record["stage_budget"]["stream"]}
    assert rows["tokenize_native"]["us_per_text_by_kind"]["frontend"] > 0
    assert rows["device"]["us_per_text_by_kind"]["engine"] > 0
