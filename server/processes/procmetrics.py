"""One /metrics for a server of several processes (`--frontends N`).

Each child serves its own registry on a loopback port; a scrape of the supervisor's port
fetches them all, adds a `process` label ("engine", "frontend-0", ...) to every series and
merges the families, so one target carries the whole server. Why not prometheus_client's
multiprocess mode: it drops callback gauges and custom collectors (queue depth, device busy
time, per-thread CPU), which are the series this server's operators read most.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["ProcessMetrics", "merge"]

log = logging.getLogger("bertstream.supervisor")
SCRAPE_TIMEOUT_S = 5.0


def merge(expositions: dict[str, str]) -> list[Metric]:
    """Families of several processes' expositions, each sample labelled with its process."""
    families: dict[str, Metric] = {}
    for process, text in expositions.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {**s.labels, "process": process}, s.value, s.timestamp,
                       s.exemplar) for s in family.samples)
    return list(families.values())


class _Children:
    """A collector over the children's endpoints, read at scrape time."""

    def __init__(self, owner: ProcessMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        children = [child for child in self._owner.children
                    if getattr(child, "metrics_port", None) is not None and child.ready.is_set()]
        # Side by side: one slow child must not push the whole scrape past its timeout.
        with ThreadPoolExecutor(max(1, len(children))) as pool:
            texts = dict(zip((c.name for c in children),
                             pool.map(lambda c: _scrape(c.name, c.metrics_port), children),
                             strict=True))
        return merge({name: text for name, text in texts.items() if text is not None})


def _scrape(name: str, port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=SCRAPE_TIMEOUT_S) as reply:
            return str(reply.read().decode())
    except OSError as exc:  # a child restarting: its series are missing this once
        log.debug("metrics of %s: %s", name, exc)
        return None


class ProcessMetrics:
    """The supervisor's registry: its own series and every child's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.children: Sequence[Any] = ()
        self.restarts = Counter("bertstream_process_restarts", "Times a process of this "
                                "server died and was started again", ["process"],
                                registry=self.registry)
        self.up = Gauge("bertstream_process_up", "1 while a process serves", ["process"],
                        registry=self.registry)
        self.registry.register(_Children(self))

    def restarted(self, name: str) -> None:
        self.restarts.labels(name).inc()

    def serve(self, host: str, port: int) -> int:
        for child in self.children:
            self.up.labels(child.name).set_function(child.ready.is_set)
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
