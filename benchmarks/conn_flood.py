"""A normal caller's latency while the HTTP port is flooded with stuck connections (issue 24):
idle sockets that never send, and slowloris sockets that send half a request head and stop.

    .venv/bin/python benchmarks/conn_flood.py --model-repository model_repository --model news-zh

Three phases against one server (HTTP and gRPC on loopback): single-text calls alone, then with
`--idle` + `--slow` stuck sockets held open (re-opened at once when a timeout sheds them, a
second later when the connection cap refuses them, as Retry-After asks), then alone again after
the flood closed. Per phase: p50 / p99 of `--calls` single-text calls over HTTP /v1/embeddings
on a keep-alive connection opened before the flood (a pooled client's) and over gRPC Embed,
what 10 callers opening new HTTP connections get (503 while the flood fills the cap: the cap
keeps the process alive and its open connections served, not the door open), and the server's
open files. The server runs with `--http-max-connections` (default here 512, so the flood
passes it and is refused at the door) and `--http-header-timeout` (5 s), so both limits are in
play.
Writes results/YYYYMMDD-HHMMSS-cpuN-MODEL-conn-flood.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from bench import RESULTS, device_name
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from server_process import ServerProcess

TEXT = "央行宣布降准0.5个百分点，释放长期资金约1万亿元。"


def _percentiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "max_ms": round(ordered[-1], 2)}


def _http_call(connection: http.client.HTTPConnection, model: str) -> float:
    """One call on a keep-alive connection (a pooled client's): the flood holds the door,
    not the connections already in."""
    body = json.dumps({"model": model, "input": [TEXT]}).encode()
    for attempt in (1, 2):  # the server closes a connection idle past its keep-alive limit
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/embeddings", body,
                               {"Content-Type": "application/json"})
            reply = connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            connection.close()
            if attempt == 2:
                raise
            continue
        reply.read()
        assert reply.status == 200, reply.status
        return (time.perf_counter() - started) * 1000
    raise AssertionError("unreachable")


def _new_connection_status(address: str, model: str) -> int:
    """What a caller opening a new connection now gets (503 while the cap is full)."""
    body = json.dumps({"model": model, "input": [TEXT]}).encode()
    request = urllib.request.Request(f"http://{address}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _measure(server: ServerProcess, model: str, calls: int,
             connection: http.client.HTTPConnection) -> dict[str, Any]:
    http_ms = [_http_call(connection, model) for _ in range(calls)]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        stub.Embed(pb.EmbedRequest(model=model, texts=[TEXT]), timeout=60)  # connect
        rpc = []
        for _ in range(calls):
            started = time.perf_counter()
            stub.Embed(pb.EmbedRequest(model=model, texts=[TEXT]), timeout=60)
            rpc.append((time.perf_counter() - started) * 1000)
    fresh = [_new_connection_status(server.http_address, model) for _ in range(10)]
    return {"http": _percentiles(http_ms), "grpc": _percentiles(rpc),
            "new_connection_statuses": {str(s): fresh.count(s) for s in sorted(set(fresh))},
            "open_files": len(os.listdir(f"/proc/{server.proc.pid}/fd"))}


class Flood:
    """`idle` sockets that never send and `slow` ones that send half a head, each re-opened
    as soon as the server closes it, on a thread of its own."""

    def __init__(self, address: str, idle: int, slow: int) -> None:
        host, port = address.rsplit(":", 1)
        self.target = (host, int(port))
        self.plan = [False] * idle + [True] * slow
        self.stop = threading.Event()
        self.opened = self.refused = self.shed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, slow: bool) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.target, timeout=5)
        except OSError:
            self.refused += 1
            return None
        sock.setblocking(False)
        if slow:
            sock.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Ty")
        self.opened += 1
        return sock

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for slow in self.plan:
            sock = self._open(slow)
            if sock is not None:
                selector.register(sock, selectors.EVENT_READ, slow)
        later: list[tuple[float, bool]] = []  # (when, slow): refused ones come back later
        while not self.stop.is_set():
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                selector.unregister(sock)
                sock.close()  # type: ignore[union-attr]
                if data.startswith(b"HTTP/1.1 503"):  # the cap: come back after Retry-After
                    self.refused += 1
                    later.append((time.monotonic() + 1.0, key.data))
                    continue
                if data.startswith(b"HTTP/1.1 408"):
                    self.shed += 1
                again = self._open(key.data)  # shed by a timeout: stuck again at once
                if again is not None:
                    selector.register(again, selectors.EVENT_READ, key.data)
            now = time.monotonic()
            due = [slow for when, slow in later if when <= now]
            later = [(when, slow) for when, slow in later if when > now]
            for slow in due:
                again = self._open(slow)
                if again is not None:
                    selector.register(again, selectors.EVENT_READ, slow)
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]

    def __enter__(self) -> Flood:
        self.thread.start()
        time.sleep(2)  # the flood is open before the first measured call
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--header-timeout", type=float, default=5.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    server = ServerProcess(args.model_repository, [
        "--default-model", args.model, "--http-max-connections", str(args.max_connections),
        "--http-header-timeout", str(args.header_timeout)], "conn_flood", http=True)
    host, port = server.http_address.rsplit(":", 1)
    # Kept alive across the phases (the server's keep-alive idle limit is 15 s; the phases'
    # gaps are shorter).
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        _measure(server, args.model, 10, connection)  # warm both paths
        alone = _measure(server, args.model, args.calls, connection)
        with Flood(server.http_address, args.idle, args.slow) as flood:
            flooded = _measure(server, args.model, args.calls, connection)
        time.sleep(args.header_timeout + 2)  # what the flood left is shed
        after = _measure(server, args.model, args.calls, connection)
    finally:
        connection.close()
        server.stop()
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name("cpu"), "cpus": os.cpu_count(), "model": args.model,
        "settings": vars(args) | {"model_repository": str(args.model_repository),
                                  "output": str(args.output) if args.output else None},
        "alone": alone, "flooded": flooded, "after": after,
        "flood": {"opened": flood.opened, "refused_503": flood.refused,
                  "shed_408": flood.shed},
    }
    for phase in ("alone", "flooded", "after"):
        row = result[phase]
        print(f"{phase:8} HTTP p50 {row['http']['p50_ms']:7.1f} p99 {row['http']['p99_ms']:7.1f}"
              f" ms | gRPC p50 {row['grpc']['p50_ms']:7.1f} p99 {row['grpc']['p99_ms']:7.1f} ms"
              f" | open files {row['open_files']} | new connections: "
              f"{row['new_connection_statuses']}")
    print(f"flood: {flood.opened} sockets opened, {flood.refused} refused 503 at the door, "
          f"{flood.shed} shed 408 after the head timeout")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.output or RESULTS / f"{stamp}-cpu{os.cpu_count()}-{args.model}-conn-flood.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
