"""The bertstream-server process a benchmark measures: started on a free loopback port with a
/metrics endpoint, its output kept (the last lines go into the error when it does not start).

Benchmarks are scripts and do not import tests/, so this is their copy of what
tests/conftest.py's ServerProcess does for the tests.

A server of several processes (`--frontends N`: a supervisor, one engine and N front ends)
is one process tree: `processes()` names its live members as its /metrics labels them
("engine", "frontend-0", ...; "supervisor" for the root, or "server" for a single process)
and `cpu_seconds` reads their CPU from /proc.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path


class ServerProcess:
    def __init__(self, repository: Path, flags: Sequence[str], who: str,
                 http: bool = False) -> None:
        """`http`: serve HTTP too, on a free port (`http_address`); else no HTTP port."""
        # A port picked here, not 0: the front ends of --frontends N must share one.
        http_port = free_port() if http else 0
        self.http_address = f"127.0.0.1:{http_port}" if http else ""
        cmd = [sys.executable, "-m", "bertstream.server", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
               "--http-port", str(http_port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.metrics_url = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("bertstream metrics on "):
                self.metrics_url = f"http://{line.split()[-1]}/metrics"
            if line.startswith("bertstream serving on "):
                self.address = line.split()[-1]
                break
        else:
            sys.exit(f"{who}: the server did not start:\n" + "".join(self.lines[-30:]))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def processes(self) -> dict[int, str]:
        """pid -> name of every live process of the server, the root first."""
        return process_names(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_pids(root: int) -> list[int]:
    """The process and all its descendants, from each process's parent in /proc/*/stat (not
    /proc/*/task/*/children: some kernels do not have it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        todo += sorted(children.get(pid, []))
    return pids


def process_names(root: int) -> dict[int, str]:
    """pid -> the `process` label the supervisor gives a child's series (from the child's
    `--role R --index I`), "supervisor" for a root with such children, else "server"."""
    names: dict[int, str] = {}
    for pid in tree_pids(root)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue  # it ended
        role = _flag(argv, "--role")
        if role == "engine":
            names[pid] = "engine"
        elif role == "frontend":
            names[pid] = f"frontend-{_flag(argv, '--index') or '0'}"
        else:
            names[pid] = f"pid-{pid}"
    return {root: "supervisor" if names else "server", **names}


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, all its threads, with that of its children that
    ended and were waited for (a restarted child's CPU stays counted); 0 if it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime (fields 14-17 of proc(5), counted from the state field)
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
