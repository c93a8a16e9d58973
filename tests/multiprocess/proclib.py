"""A `--frontends N` server seen from outside, through /proc: its children by role, whether a
process listens on the port, and which front end holds a given client connection, so a test
can kill the process its calls run on (SO_REUSEPORT spreads connections by a hash)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

__all__ = [
    "Child",
    "alive",
    "channel_to",
    "child_pid",
    "children",
    "listening",
    "open_channel",
    "peers",
    "pin_channel",
    "run_dir",
    "spread_channels",
    "wait_for",
]

T = TypeVar("T")
_LISTEN = "0A"
_ESTABLISHED = "01"
# Without it, channels to one address share one connection (grpc's global subchannel pool),
# and so one front end.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class Child:
    pid: int
    role: str  # "engine" or "frontend"
    index: int


def wait_for(condition: Callable[[], T], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll `condition` until it returns something true; fail naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def children(supervisor: int) -> list[Child]:
    """The supervisor's live engine and front-end processes. /proc lists children per thread
    that started them, so every thread's list is read."""
    pids: set[int] = set()
    for task in Path(f"/proc/{supervisor}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # threads come and go
            pids.update(int(p) for p in task.read_text().split())
    found = []
    for pid in sorted(pids):
        args = _cmdline(pid)
        if "--role" in args and "--index" in args and alive(pid):
            found.append(Child(pid, args[args.index("--role") + 1],
                               int(args[args.index("--index") + 1])))
    return found


def child_pid(supervisor: int, role: str, index: int = 0, other_than: int | None = None,
              timeout: float = 60.0) -> int:
    """The pid of the supervisor's `role` process `index`, waiting for one (other than
    `other_than`: a restarted one) to exist."""
    def find() -> int:
        return next((c.pid for c in children(supervisor)
                     if c.role == role and c.index == index and c.pid != other_than), 0)

    return wait_for(find, timeout, f"a {role} process {index} other than {other_than}")


def run_dir(pid: int) -> Path:
    """The run folder named on a child's command line."""
    args = _cmdline(pid)
    return Path(args[args.index("--run-dir") + 1])


def _sockets(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of the TCP sockets open in `pid`."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes:
                found.append((int(fields[1].rsplit(":", 1)[1], 16),
                              int(fields[2].rsplit(":", 1)[1], 16), fields[3]))
    return found


def listening(pid: int, port: int) -> bool:
    return any(local == port and state == _LISTEN for local, _, state in _sockets(pid))


def peers(pid: int, port: int) -> set[int]:
    """Client ports of the connections `pid` accepted on `port`."""
    return {remote for local, remote, state in _sockets(pid)
            if local == port and state == _ESTABLISHED}


def open_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own."""
    return grpc.insecure_channel(address, options=OWN_CONNECTION)


def pin_channel(address: str, fronts: dict[int, int],
                timeout: float = 30.0) -> tuple[grpc.Channel, int]:
    """A new connected channel and the front end (its key in `fronts`, index -> pid) that
    accepted its connection. Nothing else may connect to the port meanwhile."""
    port = int(address.rsplit(":", 1)[1])
    before = {key: peers(pid, port) for key, pid in fronts.items()}
    channel = open_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)

        def landed() -> list[int]:
            return [key for key, pid in fronts.items() if peers(pid, port) - before[key]]

        where = wait_for(landed, timeout, "the front end that accepted a new connection")
    except BaseException:
        channel.close()
        raise
    assert len(where) == 1, where
    return channel, where[0]


def channel_to(address: str, fronts: dict[int, int], want: int,
               tries: int = 64) -> grpc.Channel:
    """A channel whose connection front end `want` accepted (connections land by a hash of
    the client port, so try new ones until one does)."""
    for _ in range(tries):
        channel, where = pin_channel(address, fronts)
        if where == want:
            return channel
        channel.close()
    raise AssertionError(f"{tries} connections and none landed on front end {want}")


def spread_channels(address: str, fronts: dict[int, int], each: int,
                    limit: int = 64) -> list[tuple[grpc.Channel, int]]:
    """Connected channels, at least `each` on every front end, each with the front end that
    holds its connection."""
    pinned: list[tuple[grpc.Channel, int]] = []
    while min(sum(1 for _, key in pinned if key == want) for want in fronts) < each:
        if len(pinned) >= limit:
            for channel, _ in pinned:
                channel.close()
            raise AssertionError(f"{limit} connections did not give {each} to every front end")
        pinned.append(pin_channel(address, fronts))
    return pinned
