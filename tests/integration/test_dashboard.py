"""deploy/grafana and deploy/prometheus query only series the server exports.

A `--frontends 2` server (the mode whose /metrics carries the `process` label and the
supervisor's own series) with `--stage-timing` serves gRPC and HTTP calls, a refused model
load, and loses a front end (so the restarts counter has a sample); then every PromQL
expression of the dashboard and the alerting rules is parsed (promql-parser, Prometheus'
grammar) and each metric name, label matcher, grouping label and label_replace source must
match what a scrape of that server holds. A renamed metric or label in server/ fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx2
import pytest
import yaml
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families
from rest.conftest import start_http

promql = pytest.importorskip("promql_parser")

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS / "multiprocess") not in sys.path:
    sys.path.insert(0, str(TESTS / "multiprocess"))

from frontlib import metrics_port  # noqa: E402
from proclib import child_pid, wait_for  # noqa: E402

if TYPE_CHECKING:
    from conftest import ServerProcess

DEPLOY = TESTS.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "bertstream.json"
RULES = DEPLOY / "prometheus" / "bertstream-alerts.yml"
TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元，市场普遍预期利好"]
# Grafana's own variables, as a range the parser accepts.
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")
STATUS_CODES = {code.name for code in grpc.StatusCode}
Series = dict[str, dict[str, set[str]]]  # sample name -> label -> values seen


def _walk(node: Any) -> Iterator[Any]:
    found: list[Any] = []
    promql.walk(node, lambda n: found.append(n))
    return iter(found)


def dashboard_queries(dashboard: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """(every panel target's PromQL with the dashboard's variables put in, the
    label_values(metric, label) pairs of its variable queries)."""
    values = {v["name"]: v.get("allValue") or ".*" for v in dashboard["templating"]["list"]}

    def substitute(expr: str) -> str:
        for name in GRAFANA_RANGES:
            expr = expr.replace(name, "5m")
        return re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)",
                      lambda m: values.get(m[1] or m[2], m[0]), expr)

    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    exprs = [substitute(t["expr"]) for p in panels for t in p.get("targets", [])]
    pairs = [(m[1], m[2]) for v in dashboard["templating"]["list"] if v["type"] == "query"
             for m in [re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["definition"])]
             if m]
    return exprs, pairs


def rule_exprs(rules: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def problems(expr: str, series: Series) -> list[str]:
    """What `expr` asks for that the scrape does not hold (empty: all of it is there)."""
    tree = promql.parse(expr)
    found: list[str] = []
    labels: set[str] = set()  # of the series it selects, and the ones label_replace makes
    groupings: list[str] = []
    for node in _walk(tree):
        if isinstance(node, promql.VectorSelector):
            found += _selector_problems(node, series)
            labels |= set(series.get(node.name, {}))
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            groupings += node.modifier.labels
        elif isinstance(node, promql.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            groupings += matching.labels if matching is not None else []
        elif isinstance(node, promql.Call) and node.func.name == "label_replace":
            destination, source = node.args[1].val, node.args[3].val
            labels.add(destination)
            groupings.append(source)
    found += [f"{expr}: groups or matches on {label!r}, which no series it reads has"
              for label in groupings if label not in labels]
    return found


def _selector_problems(node: Any, series: Series) -> list[str]:
    if node.name not in series:
        return [f"{node.name}: not in the scrape"]
    found = []
    for matcher in node.matchers.matchers:
        seen = series[node.name].get(matcher.name)
        where = f"{node.name}{{{matcher}}}"
        if seen is None:
            found.append(f"{where}: the series has no label {matcher.name!r}")
        elif matcher.op == promql.MatchOp.Equal and matcher.name == "code":
            if matcher.value not in STATUS_CODES:  # any status may come; the name must exist
                found.append(f"{where}: not a gRPC status code")
        elif matcher.op == promql.MatchOp.Equal and matcher.value not in seen:
            found.append(f"{where}: value not in the scrape ({sorted(seen)})")
        elif matcher.op == promql.MatchOp.Re and not any(
                re.fullmatch(matcher.value, value) for value in seen):
            found.append(f"{where}: matches no value in the scrape ({sorted(seen)})")
    return found


def scrape(port: int) -> Series:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    series: Series = defaultdict(lambda: defaultdict(set))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                series[sample.name][label].add(value)
            series[sample.name].setdefault("__name__", set()).add(sample.name)
    return series


def processes_up(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.labels["process"] for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "bertstream_process_up" and s.value == 1}


def _serve_some_calls(server: Any) -> None:
    """gRPC unary and stream calls, OpenAI over HTTP, and a refused model load."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        for _ in range(3):
            stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS), timeout=30)
        stub.Classify(pb.ClassifyRequest(model="tiny-news", texts=TEXTS), timeout=30)
        stream = [pb.EmbedRequest(model="tiny-embed", texts=TEXTS, request_id=str(i))
                  for i in range(4)]
        assert len(list(stub.EmbedStream(iter(stream), timeout=30))) == 4
    with httpx2.Client(timeout=30) as client:
        reply = client.post(server.url + "/v1/embeddings",
                            json={"model": "tiny-embed", "input": TEXTS})
        assert reply.status_code == 200, reply.text
        # --model-control-mode none: refused FAILED_PRECONDITION, as a failed load is.
        reply = client.post(server.url + "/v2/repository/models/tiny-embed/load")
        assert reply.status_code >= 400, reply.text


def _with_a_broken_model(model_repository: Path, destination: Path) -> Path:
    """The shared models plus one whose graph is garbage: its load fails at start-up, so
    bertstream_version_load_failures_total has a sample."""
    for model in ("tiny-embed", "tiny-news"):
        shutil.copytree(model_repository / model, destination / model)
    broken = Path(shutil.copytree(model_repository / "tiny-embed", destination / "tiny-broken"))
    config = broken / "config.pbtxt"
    config.write_text(config.read_text("utf-8").replace('name: "tiny-embed"',
                                                        'name: "tiny-broken"'), "utf-8")
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    return destination


def test_dashboard_and_rules_query_only_exported_series(
        model_repository: Path, start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    rules = yaml.safe_load(RULES.read_text("utf-8"))
    repository = _with_a_broken_model(model_repository, tmp_path)
    server = start_http(start_server, repository, "--frontends", "2",
                        "--metrics-port", "0", "--stage-timing", "--restart-backoff", "1")
    port = metrics_port(server.process)
    # A front end dies first, so bertstream_process_restarts_total has a sample, and comes
    # back before the calls (a front end's counters live and die with it).
    supervisor = server.process.proc.pid
    victim = child_pid(supervisor, "frontend", 1)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "bertstream_process_restarts_total" in scrape(port), 60,
             "a restart counted")
    child_pid(supervisor, "frontend", 1, other_than=victim)
    wait_for(lambda: processes_up(port) == {"engine", "frontend-0", "frontend-1"}, 60,
             "every process up again")
    _serve_some_calls(server)
    series = scrape(port)

    exprs, label_values = dashboard_queries(dashboard)
    exprs += rule_exprs(rules)
    found = [p for expr in exprs for p in problems(expr, series)]
    found += [f"label_values({metric}, {label}): not in the scrape"
              for metric, label in label_values if label not in series.get(metric, {})]
    assert not found, "\n".join(found)
    used = {n.name for e in exprs for n in _walk(promql.parse(e))
            if isinstance(n, promql.VectorSelector)}
    # What the issue asks the dashboard to show, by the series that carries it.
    for wanted in ("bertstream_texts_total", "bertstream_request_seconds_bucket",
                   "bertstream_queue_texts", "bertstream_batch_size_bucket",
                   "bertstream_batch_tokens_total", "bertstream_device_busy_seconds",
                   "bertstream_process_restarts_total", "bertstream_thread_cpu_seconds_total"):
        assert wanted in used, wanted
    assert server.process.stop() == 0


def test_dashboard_and_rules_are_well_formed() -> None:
    """Structure Grafana and Prometheus need, checked without either (no promtool here)."""
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    rules = yaml.safe_load(RULES.read_text("utf-8"))
    names = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert len(set(names)) == len(names)
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])
            if "for" in rule:
                promql.parse_duration(rule["for"])
            promql.parse(rule["expr"])
    # The four conditions the rules exist for.
    for wanted in ("QueueFull", "CrashLooping", "VersionLoadFailed", "DeviceSaturated"):
        assert any(wanted in name for name in names), wanted


@pytest.mark.parametrize("expr, complaint", [
    ("rate(bertstream_no_such_total[5m])", "not in the scrape"),
    ('bertstream_requests_total{rpcs="Embed"}', "has no label"),
    ('bertstream_requests_total{rpc="Embedd"}', "value not in the scrape"),
    ('bertstream_requests_total{code="SLOW"}', "not a gRPC status code"),
    ('bertstream_requests_total{rpc=~"tei:.*"}', "matches no value"),
    ("sum by (dialect) (bertstream_requests_total)", "which no series it reads has"),
])
def test_the_check_catches_what_is_not_exported(expr: str, complaint: str) -> None:
    """The checker itself, on a hand-made scrape: each kind of mistake is named."""
    series: Series = {"bertstream_requests_total": {
        "rpc": {"Embed", "openai:Embeddings"}, "code": {"OK"}, "model": {"m"}}}
    found = problems(expr, series)
    assert len(found) == 1 and complaint in found[0], found
    fine = 'sum by (rpc) (rate(bertstream_requests_total{rpc=~"openai:.*", code!="OK"}[5m]))'
    assert problems(fine, series) == []
