"""The stage budget: CPU microseconds per text for each stage a text goes through, whether the
stage is serial (on the event loop, or holding the GIL anywhere) or parallel, and the ceiling
each implies on a machine with C cores.

Read from the server's own /metrics (server/stages.py: per-stage CPU clocks with
`--stage-timing`, per-thread CPU from /proc) and the CPU of its processes, before and after a
phase of the benchmark; bench.py prints and records it.

A server of several processes (`--frontends N`) labels every series with its `process`
("engine", "frontend-0", ...). The budget's rows then sum every process (per text answered
by the whole server) and keep each kind's share (engine, front ends); "serial" is serial
within one process, so a serial row's ceiling is that of the kind it is slowest in (N front
ends in parallel: N times one). `processes()` keeps the per-process view: each process's
CPU, event loop and serial (GIL) time per text it handled, how busy its event loop was and
the ceiling it sets alone, which says which process is the serial stage.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from bertstream.server.stages import STAGES, THREAD_GROUPS
from prometheus_client.parser import text_string_to_metric_families
from server_process import cpu_seconds

SINGLE = "server"  # the one process of a server without --frontends
SUPERVISOR = "supervisor"


@dataclass
class Part:
    """One process's counters."""

    stages: dict[str, float] = field(default_factory=dict)
    threads: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    texts: float = 0.0  # texts it answered (front ends; bertstream_texts_total)
    requests: float = 0.0  # calls and stream messages it answered (bertstream_requests_total)


@dataclass
class Snapshot:
    stages: dict[str, float]  # summed over processes
    threads: dict[str, float]  # summed over processes
    process_cpu_s: float  # the whole process tree
    processes: dict[str, Part] = field(default_factory=dict)  # by `process` label

    @property
    def parts(self) -> dict[str, Part]:
        """Each process's counters; a snapshot without them is one process."""
        return self.processes or {SINGLE: Part(self.stages, self.threads, self.process_cpu_s)}


def snapshot(metrics_url: str, processes: int | Mapping[int, str],
             phase_ends: bool = False) -> Snapshot:
    """The server's counters now; `processes`: pid -> name of every process of the server
    (server_process.process_names), or the pid of a single-process server. The processes'
    CPU is read after the scrape at a phase's start and before it at its end
    (`phase_ends`), so that the scrapes' own CPU (the supervisor's merging above all) stays
    out of the phase's."""
    if isinstance(processes, int):
        processes = {processes: SINGLE}

    def cpu() -> dict[str, Part]:
        return {name: Part(cpu_s=cpu_seconds(pid)) for pid, name in processes.items()}

    parts = cpu() if phase_ends else {}
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode("utf-8")
    parts = parts or cpu()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            part = parts.setdefault(sample.labels.get("process", SINGLE), Part())
            if sample.name == "bertstream_stage_cpu_seconds_total":
                part.stages[sample.labels["stage"]] = sample.value
            elif sample.name == "bertstream_thread_cpu_seconds_total":
                part.threads[sample.labels["thread"]] = sample.value
            elif sample.name == "bertstream_texts_total":
                part.texts += sample.value
            elif sample.name == "bertstream_requests_total":
                part.requests += sample.value
    stages: dict[str, float] = {}
    threads: dict[str, float] = {}
    for part in parts.values():
        for key, value in part.stages.items():
            stages[key] = stages.get(key, 0.0) + value
        for key, value in part.threads.items():
            threads[key] = threads.get(key, 0.0) + value
    return Snapshot(stages, threads, sum(p.cpu_s for p in parts.values()),
                    parts if len(parts) > 1 else {})


def kind(process: str) -> str:
    """"engine", "frontend", "supervisor" or "server" (a single process)."""
    return "frontend" if process.startswith("frontend-") else process


@dataclass
class Row:
    stage: str
    what: str
    thread: str
    serial: bool
    us_per_text: float
    # Multi-process servers: us per text (of all texts) in each kind of process, and the
    # ceiling this row alone sets (None: 1e6 / us_per_text if serial, else times the cores).
    by_kind: dict[str, float] = field(default_factory=dict)
    ceiling: float | None = None


def _rows(before: Part, after: Part, texts: float, supervisor: bool = False) -> list[Row]:
    """One process's rows for `texts` texts; every row is there, zero where it did nothing."""
    def per_text(seconds: float) -> float:
        return seconds / texts * 1e6 if texts else 0.0

    timing = bool(after.stages)
    stage_s = {k: after.stages.get(k, 0.0) - before.stages.get(k, 0.0) for k in STAGES}
    thread_s = {k: after.threads.get(k, 0.0) - before.threads.get(k, 0.0)
                for k in after.threads}
    rows = [Row(name, stage.what, stage.thread, stage.gil, per_text(stage_s[name]))
            for name, stage in STAGES.items() if timing]
    for thread, (serial, what) in THREAD_GROUPS.items():
        timed = sum(stage_s[name] for name, stage in STAGES.items() if stage.thread == thread) \
            if timing else 0.0
        if thread in thread_s:
            rows.append(Row(f"{thread}:rest", what, thread, serial,
                            per_text(max(thread_s[thread] - timed, 0.0))))
    rest = max(after.cpu_s - before.cpu_s - sum(thread_s.values()), 0.0)
    if supervisor:
        rows.append(Row(SUPERVISOR, "the supervisor process (restarts, merging /metrics)",
                        "-", False, per_text(rest)))
    else:
        rows.append(Row("unattributed", "threads that ended, /proc tick rounding", "-", False,
                        per_text(rest)))
    return rows


def budget(before: Snapshot, after: Snapshot, texts: int) -> list[Row]:
    """Rows of the budget for `texts` texts answered between the two snapshots: a
    single-process server's rows, or every process's summed, with each kind's share."""
    if not after.processes:
        return _rows(before.parts[SINGLE], after.parts[SINGLE], texts)
    total: dict[str, Row] = {}
    by_kind: dict[str, dict[str, float]] = {}
    for name, part in after.processes.items():
        rows = _rows(before.processes.get(name, Part()), part, texts, name == SUPERVISOR)
        for row in rows:
            merged = total.setdefault(row.stage, Row(row.stage, row.what, row.thread,
                                                     row.serial, 0.0))
            merged.us_per_text += row.us_per_text
            shares = by_kind.setdefault(row.stage, {})
            shares[kind(name)] = shares.get(kind(name), 0.0) + row.us_per_text
    lanes = _lanes(before, after)
    ordered = [*STAGES, *(f"{t}:rest" for t in THREAD_GROUPS), "unattributed", SUPERVISOR]
    result = []
    for stage in ordered:
        row = total.get(stage)
        if row is None or (stage in STAGES and not after.stages):
            continue
        row.by_kind = by_kind[stage]
        if row.serial:  # serial in each process: N front ends are N lanes, the engine one
            ceilings = [lanes.get(k, 1) * 1e6 / us for k, us in row.by_kind.items() if us > 0]
            row.ceiling = min(ceilings) if ceilings else None
        result.append(row)
    return result


def _lanes(before: Snapshot, after: Snapshot) -> dict[str, int]:
    """Processes of each kind that answered texts in the phase (front ends: those that got
    some; the others only idled)."""
    lanes: dict[str, int] = {}
    for name, part in after.processes.items():
        answered = part.texts - before.processes.get(name, Part()).texts
        if kind(name) != "frontend" or answered > 0:
            lanes[kind(name)] = lanes.get(kind(name), 0) + 1
    return lanes


@dataclass
class ProcessFigures:
    """One process over a phase, per text it handled (front ends: the texts they answered;
    the engine and supervisor: all)."""

    process: str
    texts: float
    requests: float
    cpu_us_per_text: float
    event_loop_us_per_text: float
    serial_gil_us_per_text: float
    event_loop_busy: float  # event loop CPU / wall time: 1 is a saturated loop
    ceiling_texts_per_s: float  # what its serial (GIL) work alone allows

    def as_json(self) -> dict[str, object]:
        return {k: (None if v == float("inf") else round(v, 3) if isinstance(v, float) else v)
                for k, v in vars(self).items()}


def processes(before: Snapshot, after: Snapshot, texts: int,
              elapsed_s: float) -> list[ProcessFigures]:
    """The per-process view of a multi-process server's phase (empty for a single process)."""
    result = []
    for name, part in after.processes.items():
        first = before.processes.get(name, Part())
        handled = part.texts - first.texts if kind(name) == "frontend" else float(texts)
        rows = _rows(first, part, handled, name == SUPERVISOR)
        loop = part.threads.get("event-loop", 0.0) - first.threads.get("event-loop", 0.0)
        serial = sum((r.us_per_text for r in rows if r.serial), 0.0)
        result.append(ProcessFigures(
            name, handled, part.requests - first.requests,
            (part.cpu_s - first.cpu_s) / handled * 1e6 if handled else 0.0,
            loop / handled * 1e6 if handled else 0.0, serial,
            loop / elapsed_s if elapsed_s > 0 else 0.0,
            1e6 / serial if serial else float("inf")))
    order = {"supervisor": 0, "engine": 1}
    return sorted(result, key=lambda p: (order.get(p.process, 2), p.process))


def summary(rows: list[Row], before: Snapshot, after: Snapshot, texts: int,
            cores: int, elapsed_s: float = 0.0) -> dict[str, float]:
    """Totals of a budget and the ceilings they imply on `cores` cores and on 16; with
    several processes, also the engine's and the front ends' own figures."""
    total = (after.process_cpu_s - before.process_cpu_s) / texts * 1e6
    loop = (after.threads.get("event-loop", 0.0) - before.threads.get("event-loop", 0.0)) \
        / texts * 1e6
    serial = sum(r.us_per_text for r in rows if r.serial)
    figures = {
        "server_cpu_us_per_text": total,
        "event_loop_us_per_text": loop,
        "serial_gil_us_per_text": serial,
    }
    ceiling = 1e6 / serial if serial else float("inf")
    if after.processes:
        figures.update(_process_summary(before, after, texts, elapsed_s))
        ceiling = min(figures.get("engine_ceiling_texts_per_s", float("inf")),
                      figures.get("frontends_ceiling_texts_per_s", float("inf")))
    figures["ceiling_serial_texts_per_s"] = ceiling
    for name, count in ((f"ceiling_{cores}_cores_texts_per_s", cores),
                        ("ceiling_16_cores_texts_per_s", 16)):
        figures[name] = min(count * 1e6 / total, ceiling) if total and serial \
            else float("inf")
    return figures


def _process_summary(before: Snapshot, after: Snapshot, texts: int,
                     elapsed_s: float) -> dict[str, float]:
    """Where the serial work is: the engine's event loop and GIL, and the front ends' (all of
    them per text, and the busiest one per text it answered), with the ceiling of each."""
    figures: dict[str, float] = {}
    each = processes(before, after, texts, elapsed_s)
    engine = next((p for p in each if p.process == "engine"), None)
    if engine is not None:
        figures["engine_event_loop_us_per_text"] = engine.event_loop_us_per_text
        figures["engine_serial_gil_us_per_text"] = engine.serial_gil_us_per_text
        figures["engine_event_loop_busy"] = engine.event_loop_busy
        figures["engine_ceiling_texts_per_s"] = engine.ceiling_texts_per_s
    fronts = [p for p in each if kind(p.process) == "frontend"]
    if fronts:
        working = [p for p in fronts if p.texts > 0]
        loop = sum(p.event_loop_us_per_text * p.texts for p in fronts) / texts
        serial = sum(p.serial_gil_us_per_text * p.texts for p in fronts) / texts
        figures["frontends"] = len(fronts)
        figures["frontends_answering"] = len(working)
        figures["frontends_event_loop_us_per_text"] = loop
        figures["frontends_serial_gil_us_per_text"] = serial
        figures["frontends_ceiling_texts_per_s"] = len(working) * 1e6 / serial if serial \
            else float("inf")
        busiest = max(fronts, key=lambda p: p.event_loop_busy)
        figures["busiest_frontend_texts_share"] = busiest.texts / texts
        figures["busiest_frontend_event_loop_us_per_text"] = busiest.event_loop_us_per_text
        figures["busiest_frontend_serial_gil_us_per_text"] = busiest.serial_gil_us_per_text
        figures["busiest_frontend_event_loop_busy"] = busiest.event_loop_busy
        figures["frontend_ceiling_texts_per_s"] = busiest.ceiling_texts_per_s
    return figures


def bound_by(figures: Mapping[str, float]) -> str:
    """Which kind of process sets the serial ceiling of a multi-process server's phase."""
    engine = figures.get("engine_ceiling_texts_per_s", float("inf"))
    fronts = figures.get("frontends_ceiling_texts_per_s", float("inf"))
    return "engine" if engine <= fronts else "frontends"


def table(rows: list[Row], cores: int) -> str:
    """The budget as text: one line per stage with the ceiling it alone would set (and, for
    several processes, its CPU in the engine and in the front ends)."""
    split = any(r.by_kind for r in rows)
    lines = [f"{'stage':<22}{'us/text':>9}" + (f"{'engine':>9}{'fronts':>9}" if split else "")
             + f"  {'thread':<17}{'kind':<9}"
             f"{'ceiling alone, ' + str(cores) + ' cores':>26}  what"]
    for row in rows:
        if row.us_per_text <= 0:
            ceiling = "-"
        else:
            alone = row.ceiling if row.serial and row.ceiling is not None else \
                1e6 / row.us_per_text * (1 if row.serial else cores)
            ceiling = f"{alone:,.0f} /s"
        shares = (f"{row.by_kind.get('engine', 0.0):>9.1f}"
                  f"{row.by_kind.get('frontend', 0.0):>9.1f}") if split else ""
        lines.append(f"{row.stage:<22}{row.us_per_text:>9.1f}{shares}  {row.thread:<17}"
                     f"{'serial' if row.serial else 'parallel':<9}{ceiling:>26}  {row.what}")
    return "\n".join(lines)


def process_table(each: list[ProcessFigures], figures: Mapping[str, float]) -> str:
    """The per-process view: which process's serial work sets the ceiling."""
    lines = [f"{'process':<14}{'texts':>8}{'requests':>9}{'cpu':>9}{'loop':>9}{'serial':>9}"
             f"{'loop busy':>11}{'ceiling alone':>16}   (us per text it handled)"]
    for p in each:
        ceiling = f"{p.ceiling_texts_per_s:,.0f} /s" if p.serial_gil_us_per_text else "-"
        lines.append(f"{p.process:<14}{p.texts:>8.0f}{p.requests:>9.0f}"
                     f"{p.cpu_us_per_text:>9.1f}{p.event_loop_us_per_text:>9.1f}"
                     f"{p.serial_gil_us_per_text:>9.1f}{p.event_loop_busy:>11.2f}{ceiling:>16}")
    if "frontends" in figures:
        lines.append(
            f"front ends: event loop {figures['frontends_event_loop_us_per_text']:.1f} us, "
            f"serial {figures['frontends_serial_gil_us_per_text']:.1f} us per text (all "
            f"of them); {figures['frontends_answering']:.0f} of {figures['frontends']:.0f} "
            f"answered, together {figures['frontends_ceiling_texts_per_s']:,.0f} /s")
    if "engine_ceiling_texts_per_s" in figures:
        lines.append(f"engine: {figures['engine_ceiling_texts_per_s']:,.0f} /s; the serial "
                     f"stage is the {bound_by(figures)}")
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for r in rows:
        row: dict[str, object] = {"stage": r.stage, "what": r.what, "thread": r.thread,
                                  "serial": r.serial, "us_per_text": round(r.us_per_text, 2)}
        if r.by_kind:
            row["us_per_text_by_kind"] = {k: round(v, 2) for k, v in r.by_kind.items()}
        if r.ceiling is not None:
            row["ceiling_texts_per_s"] = round(r.ceiling, 1)
        out.append(row)
    return out
