"""bench.py's HTTP row: texts per second through OpenAI's `POST /v1/embeddings`, beside the
gRPC streams of the same run, on the same server and texts.

Each feed is a process (as the gRPC feeds are, so the load generator's GIL is not what is
measured) with `connections` keep-alive connections, a thread each, one request at a time per
connection, `per_message` texts a request: what an OpenAI-client user with a thread pool
does. Requests ask `encoding_format: base64` (the official client's default) and the feed
decodes the vectors. stdlib http.client and orjson: nothing to install beyond the server's
own packages. With `--frontends N` each connection of feed i is put on front end i mod N,
as the gRPC feeds' are (placement.py).
"""

from __future__ import annotations

import base64
import http.client
import sys
import threading
from typing import Any

import numpy as np
import orjson
from placement import owner

__all__ = ["http_feed"]


def open_connection(address: str, target: int | None, pids: list[int],
                    tries: int = 400) -> tuple[http.client.HTTPConnection, bool]:
    """A keep-alive connection that a front end has accepted (one answered GET), landed on
    `target` if one is given; returns it and whether it landed."""
    host, port = address.rsplit(":", 1)
    for _ in range(tries if target is not None else 1):
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        connection.request("GET", "/v1/models")
        reply = connection.getresponse()
        reply.read()
        if reply.status != 200:
            sys.exit(f"bench: GET /v1/models answered {reply.status}")
        if target is None:
            return connection, False
        assert connection.sock is not None
        landed = owner(int(port), connection.sock.getsockname()[1], pids)
        if landed is None or landed == target:
            return connection, landed == target
        connection.close()
    sys.exit(f"bench: no HTTP connection landed on front-end process {target} in {tries} tries")


def _send(connection: http.client.HTTPConnection, model: str, requests: list[list[str]],
          failures: list[str]) -> None:
    """One connection's share, a request at a time; what fails is counted, not raised."""
    try:
        for texts in requests:
            body = orjson.dumps({"model": model, "input": texts, "encoding_format": "base64"})
            connection.request("POST", "/v1/embeddings", body,
                               {"content-type": "application/json"})
            reply = connection.getresponse()
            answer = reply.read()
            if reply.status != 200:
                failures.append(f"{reply.status}: {answer[:200]!r}")
                continue
            rows = orjson.loads(answer)["data"]
            vectors = [np.frombuffer(base64.b64decode(row["embedding"]), "<f4") for row in rows]
            if len(vectors) != len(texts):
                failures.append(f"{len(vectors)} vectors for {len(texts)} texts")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        failures.append(repr(exc))


def http_feed(address: str, model: str, share: list[str], setting: tuple[int, int],
              place: tuple[int | None, list[int]], barrier: Any, counts: Any) -> None:
    """One feed (bench.py's _run_feeds target): `setting` is (texts per request, connections).
    Waits at the barrier once connected and again once answered."""
    per_message, connections = setting
    requests = [share[i:i + per_message] for i in range(0, len(share), per_message)]
    opened = [open_connection(address, *place) for _ in range(connections)]
    failures: list[str] = []
    threads = [threading.Thread(target=_send, args=(connection, model, requests[i::connections],
                                                    failures))
               for i, (connection, _) in enumerate(opened)]
    barrier.wait()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    barrier.wait()
    for connection, _ in opened:
        connection.close()
    missed = sum(1 for _, landed in opened if place[0] is not None and not landed)
    with counts.get_lock():
        counts[0] += len(failures)
        counts[1] += 1 if missed else 0
    if failures:
        print(f"bench: {len(failures)} HTTP requests failed, first: {failures[0]}",
              file=sys.stderr)
