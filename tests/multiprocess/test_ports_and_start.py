"""The ports are this server's alone, and a SIGTERM while it starts stops it in order.

SO_REUSEPORT lets front ends share a port; without a check, a second server started on the
same port would bind it too and take a share of the connections. And a supervisor that only
handled SIGTERM once serving was killed outright by one that came while models loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rest.conftest import free_port

if TYPE_CHECKING:
    from conftest import ServerProcess


def _second(repository: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bertstream.server", "--model-repository",
                           str(repository), "--host", "127.0.0.1", *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_second_server_cannot_take_a_share_of_the_http_port(
        model_repository: Path, start_server: Callable[..., ServerProcess],
        frontends: str) -> None:
    http = free_port()
    first = start_server(model_repository, "--http-port", str(http), "--frontends", frontends)
    done = _second(model_repository, "--port", "0", "--http-port", str(http),
                   "--frontends", frontends)
    assert done.returncode != 0
    assert f"cannot bind the HTTP port 127.0.0.1:{http}" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_a_second_multiprocess_server_cannot_take_a_share_of_the_grpc_port(
        model_repository: Path, start_server: Callable[..., ServerProcess]) -> None:
    first = start_server(model_repository, "--frontends", "2")
    port = first.address.rsplit(":", 1)[1]
    done = _second(model_repository, "--port", port, "--http-port", "0", "--frontends", "2")
    assert done.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}" in done.stdout + done.stderr
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_sigterm_while_starting_stops_every_process_and_exits_0(
        model_repository: Path, tmp_path: Path) -> None:
    before = set(Path("/tmp").glob("bertstream-*"))
    proc = subprocess.Popen([sys.executable, "-m", "bertstream.server", "--model-repository",
                             str(model_repository), "--host", "127.0.0.1", "--port", "0",
                             "--http-port", "0", "--frontends", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: set[int] = set()
    deadline = time.monotonic() + 60
    while not children and time.monotonic() < deadline:  # the engine is starting
        path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        children = {int(pid) for pid in path.read_text().split()} if path.exists() else set()
        time.sleep(0.02)
    assert children, "the supervisor started no process"
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "bertstream serving on" not in out and "Traceback" not in out
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert set(Path("/tmp").glob("bertstream-*")) <= before  # its run folder is gone
