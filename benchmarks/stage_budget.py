"""The stage budget: CPU microseconds per text for each stage a text goes through, whether the
stage is serial (on the event loop, or holding the GIL anywhere) or parallel, and the ceiling
each implies on a machine with C cores.

Read from the server's own /metrics (server/stages.py: per-stage CPU clocks with
`--stage-timing`, per-thread CPU from /proc) and its process's total CPU, before and after a
phase of the benchmark; bench.py prints and records it.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bertstream.server.stages import STAGES, THREAD_GROUPS
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    stages: dict[str, float]
    threads: dict[str, float]
    process_cpu_s: float


def snapshot(metrics_url: str, pid: int) -> Snapshot:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode("utf-8")
    stages: dict[str, float] = {}
    threads: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bertstream_stage_cpu_seconds_total":
                stages[sample.labels["stage"]] = sample.value
            elif sample.name == "bertstream_thread_cpu_seconds_total":
                threads[sample.labels["thread"]] = sample.value
    return Snapshot(stages, threads, process_cpu_seconds(pid))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process, all threads, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    stage: str
    what: str
    thread: str
    serial: bool
    us_per_text: float


def budget(before: Snapshot, after: Snapshot, texts: int) -> list[Row]:
    """Rows of the budget for `texts` texts answered between the two snapshots."""
    def per_text(seconds: float) -> float:
        return seconds / texts * 1e6

    stage_s = {k: after.stages.get(k, 0.0) - before.stages.get(k, 0.0) for k in STAGES}
    thread_s = {k: after.threads.get(k, 0.0) - before.threads.get(k, 0.0)
                for k in after.threads}
    rows = [Row(name, stage.what, stage.thread, stage.gil, per_text(stage_s[name]))
            for name, stage in STAGES.items() if after.stages]
    for thread, (serial, what) in THREAD_GROUPS.items():
        timed = sum(stage_s[name] for name, stage in STAGES.items() if stage.thread == thread) \
            if after.stages else 0.0
        rest = thread_s.get(thread, 0.0) - timed
        if thread in thread_s:
            rows.append(Row(f"{thread}:rest", what, thread, serial, per_text(max(rest, 0.0))))
    accounted = sum(thread_s.values())
    process = after.process_cpu_s - before.process_cpu_s
    rows.append(Row("unattributed", "threads that ended, /proc tick rounding", "-", False,
                    per_text(max(process - accounted, 0.0))))
    return rows


def summary(rows: list[Row], before: Snapshot, after: Snapshot, texts: int,
            cores: int) -> dict[str, float]:
    """Totals of a budget and the ceilings they imply on `cores` cores and on 16."""
    total = (after.process_cpu_s - before.process_cpu_s) / texts * 1e6
    loop = (after.threads.get("event-loop", 0.0) - before.threads.get("event-loop", 0.0)) \
        / texts * 1e6
    serial = sum(r.us_per_text for r in rows if r.serial)
    return {
        "server_cpu_us_per_text": total,
        "event_loop_us_per_text": loop,
        "serial_gil_us_per_text": serial,
        "ceiling_serial_texts_per_s": 1e6 / serial if serial else float("inf"),
        f"ceiling_{cores}_cores_texts_per_s": min(cores * 1e6 / total, 1e6 / serial)
        if total and serial else float("inf"),
        "ceiling_16_cores_texts_per_s": min(16 * 1e6 / total, 1e6 / serial)
        if total and serial else float("inf"),
    }


def table(rows: list[Row], cores: int) -> str:
    """The budget as text: one line per stage with the ceiling it alone would set."""
    lines = [f"{'stage':<22}{'us/text':>9}  {'thread':<17}{'kind':<9}"
             f"{'ceiling alone, ' + str(cores) + ' cores':>26}  what"]
    for row in rows:
        if row.us_per_text <= 0:
            ceiling = "-"
        else:
            alone = 1e6 / row.us_per_text * (1 if row.serial else cores)
            ceiling = f"{alone:,.0f} /s"
        lines.append(f"{row.stage:<22}{row.us_per_text:>9.1f}  {row.thread:<17}"
                     f"{'serial' if row.serial else 'parallel':<9}{ceiling:>26}  {row.what}")
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict[str, object]]:
    return [{"stage": r.stage, "what": r.what, "thread": r.thread, "serial": r.serial,
             "us_per_text": round(r.us_per_text, 2)} for r in rows]
