"""`make report`: the speed pictures in docs/img/, drawn from the results JSON of the benchmarks.

    .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--output docs/img]

For each kind of result, the latest file by the timestamp its name starts with (a file's kind
is read from its content, since the names vary):
- sweep.py: throughput and latency against texts per request and against concurrency
  (speed-sweep.png);
- engines.py and precision.py: the CPU engines and precisions side by side
  (speed-engines.png);
- peers.py (`make bench-peers`): bertstream beside infinity, texts/s and single-text latency
  (speed-peers.png);
- bench.py: the stage budget as stacked bars, CPU per text by stage for each phase, all of it
  and without the device's own work (speed-stage-budget.png).
Each picture names its run file, machine and date in a footer. A kind with no result is
skipped with the reason printed; the others are still drawn.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMAGES = HERE.parent / "docs" / "img"
DPI = 100
BERTSTREAM, PEER, OTHER = "#1f77b4", "#ff7f0e", "#7f7f7f"
# 20261207-163617-..., 20261126c-... (a letter: runs of one day without a time in the name)
STAMP = re.compile(r"(\d{8})(?:-(\d{6}))?([a-z]?)(?=-)")


@dataclass(frozen=True)
class Run:
    path: Path
    record: dict[str, Any]

    def footer(self) -> str:
        """Run file, machine and date, as each picture names them."""
        r = self.record
        device = r.get("device") or ""
        cores = r.get("cpu_count") or r.get("cpus")
        machine = ", ".join(x for x in (str(device), f"{cores} CPUs" if cores else "") if x)
        date = str(r.get("date") or r.get("created") or "?")[:16].replace("T", " ")
        return f"{self.path.name} | {machine or 'machine not recorded'} | {date}"


def stamp(path: Path) -> tuple[str, str, str] | None:
    match = STAMP.search(path.name)
    return (match[1], match[2] or "", match[3]) if match else None


KINDS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "sweep": lambda r: isinstance(r.get("sweep"), dict),
    "bench": lambda r: isinstance(r.get("stage_budget"), dict)
    and "service_stream_texts_per_s" in r.get("figures", {}),
    "engines": lambda r: isinstance(r.get("raw"), dict) and isinstance(r.get("service"), dict),
    "precision": lambda r: isinstance(r.get("engines"), dict) and "verdict" in r,
    "peers": lambda r: "peers_versions" in r and isinstance(r.get("figures"), dict),
}
SCRIPT = {"sweep": "benchmarks/sweep.py", "bench": "benchmarks/bench.py",
          "engines": "benchmarks/engines.py", "precision": "benchmarks/precision.py",
          "peers": "make bench-peers"}


def latest(results: Path) -> dict[str, Run]:
    """The newest run of each kind, by the timestamp in its file name."""
    found: dict[str, tuple[tuple[str, str, str], Run]] = {}
    for path in sorted(results.glob("*.json")):
        when = stamp(path)
        if when is None:
            continue
        try:
            record = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            print(f"report: {path.name} unreadable ({exc}): ignored")
            continue
        if not isinstance(record, dict):
            continue
        for kind, test in KINDS.items():
            if test(record) and (kind not in found or when >= found[kind][0]):
                found[kind] = (when, Run(path, record))
    return {kind: run for kind, (_, run) in found.items()}


def _figure(width: float, height: float, title: str, footers: list[str]) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    figure.suptitle(title, fontsize=11)
    figure.supxlabel("\n".join(footers), fontsize=7, color="#555555")  # laid out below all
    return figure


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def draw_sweep(run: Run, output: Path) -> Path:
    sweep = run.record["sweep"]
    engine = run.record.get("settings", {}).get("cpu_engine")
    figure = _figure(10, 4.2, f"bertstream {run.record.get('model', '')}"
                              f"{f' on {engine}' if engine else ''}: unary Embed, "
                              "throughput and latency", [run.footer()])
    axes = figure.subplots(1, 2)
    for ax, key, label in ((axes[0], "texts_per_request", "texts per request"),
                           (axes[1], "concurrency", "concurrent callers")):
        points = sweep.get(key) or []
        if not points:
            ax.set_axis_off()
            continue
        x = [p[key] for p in points]
        fixed = "concurrency" if key == "texts_per_request" else "texts_per_request"
        ax.plot(x, [p["texts_per_s"] for p in points], "o-", color=BERTSTREAM, label="texts/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(f"{label} ({fixed.replace('_', ' ')} {points[0][fixed]})")
        ax.set_ylabel("texts/s", color=BERTSTREAM)
        ax.set_ylim(bottom=0)
        for p in points:  # calls the server refused RESOURCE_EXHAUSTED (its admission limit)
            if p.get("refused"):
                ax.annotate(f"{p['refused']} refused", (p[key], p["texts_per_s"]),
                            textcoords="offset points", xytext=(0, -12), ha="center",
                            fontsize=7, color="#d62728")
        latency = ax.twinx()
        for quantile, style, colour in (("p50_ms", "s--", PEER), ("p99_ms", "^:", "#d62728")):
            latency.plot(x, [p.get(quantile) or float("nan") for p in points], style,
                         color=colour, label=quantile.replace("_", " "))
        latency.set_ylabel("call latency, ms")
        latency.set_ylim(bottom=0)
        lines = ax.get_lines() + latency.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    return _save(figure, output / "speed-sweep.png")


def draw_peers(run: Run, output: Path) -> Path:
    figures: dict[str, dict[str, float]] = run.record["figures"]
    names = sorted(figures, key=lambda n: figures[n].get("texts_per_s", 0))
    colours = [BERTSTREAM if n.startswith("bertstream") else PEER for n in names]
    settings = run.record.get("settings", {})
    encoder = str(run.record.get("encoder", "")).split(" (")[0]
    figure = _figure(10, 4.6, f"bertstream beside infinity, {encoder}: "
                              f"{settings.get('callers', '?')} callers x "
                              f"{settings.get('per_request', '?')} texts a request",
                     [run.footer()])
    left, right = figure.subplots(1, 2, sharey=True)
    speeds = [figures[n].get("texts_per_s", 0) for n in names]
    left.barh(names, speeds, color=colours)
    for y, value in enumerate(speeds):
        left.text(value, y, f" {value:.1f}", va="center", fontsize=8)
    left.set_xlim(right=max(speeds) * 1.12)
    left.set_xlabel("texts/s (higher is better)")
    p50 = [figures[n].get("single_p50_ms", 0) for n in names]
    p99 = [figures[n].get("single_p99_ms", 0) for n in names]
    right.barh(names, p99, color=colours, alpha=0.35)
    right.barh(names, p50, color=colours)
    right.set_xlabel("one short text: p50 (dark), p99 (light), ms; lower is better")
    left.tick_params(axis="y", labelsize=8)
    return _save(figure, output / "speed-peers.png")


def draw_engines(engines: Run | None, precision: Run | None, output: Path) -> Path:
    footers = [run.footer() for run in (engines, precision) if run is not None]
    figure = _figure(10, 4.4, "CPU engines and precisions, texts/s", footers)
    left, right = figure.subplots(1, 2)
    if engines is not None:
        raw, service = engines.record["raw"], engines.record["service"]
        names = [f"bare {n}" for n in raw] + [f"served {n}" for n in service]
        values = [raw[n]["texts_per_s"] for n in raw] + [service[n]["texts_per_s"]
                                                        for n in service]
        left.bar(names, values, color=[OTHER] * len(raw) + [BERTSTREAM] * len(service))
        for x, value in enumerate(values):
            left.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
        left.set_title(f"engines.py: {engines.record.get('model', '')}", fontsize=9)
        left.tick_params(axis="x", labelrotation=20, labelsize=8)
        left.set_xticks(range(len(names)), names, ha="right", rotation_mode="anchor")
    else:
        left.set_axis_off()
    if precision is not None:
        rows = precision.record["engines"]
        names = list(rows)
        values = [rows[n]["texts_per_s"] for n in names]
        right.bar(names, values, color=BERTSTREAM)
        for x, name in enumerate(names):
            row = rows[name]
            right.text(x, values[x], f"{values[x]:.1f}\ncos {row.get('min_cosine', 0):.4f}\n"
                       f"acc {row.get('accuracy', 0):.3f}", ha="center", va="bottom",
                       fontsize=7)
        right.set_ylim(top=max(values) * 1.3)
        right.set_title("precision.py: texts/s, min cosine to fp32, accuracy", fontsize=9)
        right.tick_params(axis="x", labelrotation=20, labelsize=8)
        right.set_xticks(range(len(names)), names, ha="right", rotation_mode="anchor")
    else:
        right.set_axis_off()
    return _save(figure, output / "speed-engines.png")


def draw_stage_budget(run: Run, output: Path) -> Path:
    budget: dict[str, list[dict[str, Any]]] = run.record["stage_budget"]
    phases = [p for p in ("stream", "unary", "http") if budget.get(p)]
    stages = list(dict.fromkeys(row["stage"] for p in phases for row in budget[p]))
    device = {"device", "onnxruntime-pool:rest"}  # the model's own work, not the pipeline's
    figure = _figure(10, 5.2, f"Stage budget, {run.record.get('model', '')}: CPU microseconds "
                              "per text (hatched: serial, holds the GIL)", [run.footer()])
    axes = figure.subplots(1, 2)
    cmap = _colours(len(stages))
    for ax, shown, title in ((axes[0], stages, "every stage"),
                             (axes[1], [s for s in stages if s not in device],
                              "without the device and its pool")):
        bottoms = [0.0] * len(phases)
        for stage in shown:
            rows = [{r["stage"]: r for r in budget[p]}.get(stage) for p in phases]
            heights = [r["us_per_text"] if r else 0.0 for r in rows]
            serial = any(r and r.get("serial") for r in rows)
            ax.bar(phases, heights, bottom=bottoms, color=cmap[stages.index(stage)],
                   hatch="//" if serial else None, edgecolor="white", linewidth=0.3,
                   label=stage)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        for x, total in enumerate(bottoms):
            ax.text(x, total, f"{total:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("us per text")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=7)
    return _save(figure, output / "speed-stage-budget.png")


def _colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(count)]


def render(results: Path, output: Path) -> list[Path]:
    """Every picture the results allow; prints why each missing one is skipped."""
    runs = latest(results)
    output.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        if kind not in runs:
            print(f"report: no {kind} results in {results} (run {SCRIPT[kind]}): skipped")
    drawn = []
    if "sweep" in runs:
        drawn.append(draw_sweep(runs["sweep"], output))
    if "peers" in runs:
        drawn.append(draw_peers(runs["peers"], output))
    if "engines" in runs or "precision" in runs:
        drawn.append(draw_engines(runs.get("engines"), runs.get("precision"), output))
    if "bench" in runs:
        drawn.append(draw_stage_budget(runs["bench"], output))
    for path in drawn:
        print(f"report: {path} ({path.stat().st_size // 1024} KB)")
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=IMAGES)
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"report: {args.results} is not a folder", file=sys.stderr)
        return 2
    render(args.results, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
