"""Clients of a `--frontends 2` server, sorted by the front-end process that answers them.

SO_REUSEPORT hands each new connection to a front end by a hash of the client's port, so a
test that must reach every front end opens clients, each on a connection of its own, until
each front end has answered enough of them. Which front end answered a client is read from
the server's merged /metrics (`bertstream_requests_total` by its `process` label): the proof
that both were reached is the server's own count, and works for any client (grpc channels,
secure ones, tritonclient) that makes one counted call (Embed, Classify, ModelInfer).
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import ServerProcess

__all__ = ["FRONT_ENDS", "OWN_CONNECTION", "metrics_port", "open_channel", "requests_by_process",
           "sort_by_front_end"]

T = TypeVar("T")
FRONT_ENDS = ("frontend-0", "frontend-1")
# Without it, channels to one address share one connection (grpc's global subchannel pool),
# and so one front end.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
METRICS_LINE = "bertstream metrics on "


def open_channel(address: str) -> grpc.Channel:
    """A plaintext channel with a connection of its own."""
    return grpc.insecure_channel(address, options=OWN_CONNECTION)


def metrics_port(server: ServerProcess) -> int:
    """The supervisor's /metrics port (the server was started with --metrics-port 0)."""
    line = next(line for line in server.lines if line.startswith(METRICS_LINE))
    return int(line.rsplit(":", 1)[1])


def requests_by_process(port: int, **labels: str) -> Counter[str]:
    """`bertstream_requests_total` per `process`, summed over the samples whose labels include
    `labels` (say model="tiny-news", code="OK")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "bertstream_requests_total"
                    and all(sample.labels.get(k) == v for k, v in labels.items())):
                counts[sample.labels["process"]] += sample.value
    return counts


def sort_by_front_end(connect: Callable[[], T], probe: Callable[[T], Any], port: int,
                      each: int, limit: int = 64) -> list[tuple[str, T]]:
    """`each` clients per front end, interleaved (frontend-0, frontend-1, frontend-0, ...), each
    with the front end that answered its `probe`: one counted call. Nothing else may call the
    server meanwhile. Clients beyond `each` on a front end are closed."""
    kept: dict[str, list[T]] = {name: [] for name in FRONT_ENDS}
    before = requests_by_process(port)
    for _ in range(limit):
        client = connect()
        probe(client)
        after = requests_by_process(port)
        [front] = [p for p in after if after[p] != before[p]]  # exactly one process counted it
        before = after
        if len(kept[front]) < each:
            kept[front].append(client)
        else:
            client.close()  # type: ignore[attr-defined]
        if all(len(clients) == each for clients in kept.values()):
            return [(name, kept[name][i]) for i in range(each) for name in FRONT_ENDS]
    for clients in kept.values():
        for client in clients:
            client.close()  # type: ignore[attr-defined]
    raise AssertionError(f"{limit} connections did not give {each} to every front end")
