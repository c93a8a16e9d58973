"""The bertstream-server process a benchmark measures: started on a free loopback port with a
/metrics endpoint, its output kept (the last lines go into the error when it does not start).

Benchmarks are scripts and do not import tests/, so this is their copy of what
tests/conftest.py's ServerProcess does for the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path


class ServerProcess:
    def __init__(self, repository: Path, flags: Sequence[str], who: str) -> None:
        cmd = [sys.executable, "-m", "bertstream.server", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *flags]
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

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)
