"""Which front-end process holds a connection (`--frontends N`), for bench.py's feeds.

The front ends share one port with SO_REUSEPORT: the kernel hashes each new connection (not
each call) to one of them, so a few connections can leave some front ends idle and others
doubled up. A feed with a target opens connections until one lands on its front end, told by
which process holds the server's end of it (/proc/net/tcp and /proc/PID/fd: server and feeds
run on this machine), and closes the others. gRPC channels (bench.py) and HTTP connections
(http_feed.py) are placed alike.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["Placement", "client_ports", "owner"]


def _tcp_connections() -> list[tuple[int, int, int]]:
    """(local port, remote port, socket inode) of every established TCP connection here (on
    loopback the kernel lists both ends of each)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01":  # ESTABLISHED
                found.append((int(fields[1].rsplit(":", 1)[1], 16),
                              int(fields[2].rsplit(":", 1)[1], 16), int(fields[9])))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.scandir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(fd.path)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


class Placement:
    """Which front-end process each feed's connections should land on."""

    def __init__(self, frontends: dict[int, str], even: bool) -> None:
        self.pids = sorted(frontends, key=lambda pid: frontends[pid])
        self.even = even and len(self.pids) > 1
        self.missed = 0  # feeds whose connection could not be placed (landed where it did)

    def target(self, feed: int) -> int | None:
        return self.pids[feed % len(self.pids)] if self.even else None


def owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The server process holding the server's end of the connection from `client_port`."""
    ends = {inode for local, remote, inode in _tcp_connections()
            if local == server_port and remote == client_port}
    for pid in pids:
        try:
            if ends & _socket_inodes(pid):
                return pid
        except OSError:
            return None  # its /proc cannot be read here: no placement
    return None


def client_ports(server_port: int) -> set[int]:
    """This process's own ends (local ports) of its connections to `server_port`."""
    own = _socket_inodes(os.getpid())
    return {local for local, remote, inode in _tcp_connections()
            if remote == server_port and inode in own}
