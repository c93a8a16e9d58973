"""The supervisor of `--frontends N`: one engine process, N front-end processes on one port.

Contract:
- The port is reserved here with SO_REUSEPORT and held (never listened on) for the server's
  life, so every front end binds the same port (gRPC's multiprocessing example does the same)
  and `--port 0` still means one port for all of them.
- The engine starts first; front ends start once it serves. "bertstream serving on HOST:PORT"
  is printed when every front end serves, as the single process prints it.
- A child that exits while the server runs is restarted (its calls in flight end UNAVAILABLE;
  front ends reconnect to a new engine by themselves). One that died `CRASH_LOOP` times within
  `CRASH_WINDOW_S` is crash-looping: the log says so, health reports it
  (`bertstream.processes` NOT_SERVING, via processes.json in the run folder) and it is retried
  only every `CRASH_BACKOFF_S` (tests shorten it: `--restart-backoff`).
- SIGTERM / SIGINT: front ends drain first (their calls still need the engine), then the
  engine stops. With `--metrics-port`, one /metrics here carries every process's series with
  a `process` label (procmetrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .. import ports
from .procmetrics import ProcessMetrics

__all__ = ["SupervisorOptions", "supervise"]

log = logging.getLogger("bertstream.supervisor")
CRASH_LOOP = 5
CRASH_WINDOW_S = 60.0
CRASH_BACKOFF_S = 30.0
RESTART_DELAY_S = 0.2
START_TIMEOUT_S = 600.0  # loading a large model can take minutes
STOP_EXTRA_S = 15.0  # beyond the grace period, before a child that will not stop is killed
PROCESSES_FILE = "processes.json"


@dataclass(frozen=True)
class SupervisorOptions:
    """What the supervisor needs of the server's options (app.py builds it from them)."""

    host: str
    port: int
    http_port: int  # 0: no HTTP port to check before the children start
    metrics_port: int | None  # None: no merged /metrics
    frontends: int
    grace_period_s: float
    restart_backoff_s: float = CRASH_BACKOFF_S
    argv: tuple[str, ...] = ()  # the server's own command line, passed on to the children


class Child:
    """One engine or front-end process, restarted whenever it dies while the server runs."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.deaths: deque[float] = deque(maxlen=CRASH_LOOP)
        self.ready = asyncio.Event()
        self.metrics_port: int | None = None
        self._status: asyncio.Task[None] | None = None  # a reference keeps the task alive

    @property
    def crash_looping(self) -> bool:
        return (len(self.deaths) == CRASH_LOOP
                and self.deaths[-1] - self.deaths[0] <= CRASH_WINDOW_S)

    async def start(self) -> None:
        read_fd, write_fd = os.pipe()
        self.ready.clear()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bertstream.server", *self.args,
                "--status-fd", str(write_fd), pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        self._status = asyncio.get_running_loop().create_task(self._read_status(read_fd))

    async def _read_status(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
        try:
            async for raw in reader:
                line = raw.decode().strip()
                if line == "ready":
                    self.ready.set()
                elif line.startswith("metrics "):
                    self.metrics_port = int(line.split()[1])
        finally:
            transport.close()


class Supervisor:
    def __init__(self, options: SupervisorOptions) -> None:
        self.options = options
        self.run_dir = Path(tempfile.mkdtemp(prefix="bertstream-"))  # mode 0700
        self.stopping = False
        self.metrics = ProcessMetrics()
        self.children: list[Child] = []
        self._stop_asked = asyncio.Event()

    def _args(self, role: str, index: int, port: int) -> list[str]:
        return [*self.options.argv, "--role", role, "--run-dir", str(self.run_dir),
                "--index", str(index), "--port", str(port)]

    async def run(self) -> None:
        options = self.options
        # First: a SIGTERM while models load (minutes, for large ones) must stop the server
        # in order, not kill the supervisor and leave its children to their death signal.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_asked.set)
        try:
            if options.http_port:
                ports.check_free(options.host, options.http_port, "the HTTP port ")
            with _reserve_port(options.host, options.port) as port:
                await self._serve(port)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _serve(self, port: int) -> None:
        options = self.options
        engine = Child("engine", self._args("engine", 0, port))
        fronts = [Child(f"frontend-{i}", self._args("frontend", i, port))
                  for i in range(options.frontends)]
        self.children = [engine, *fronts]
        watchers = [asyncio.create_task(self._keep(engine))]
        try:
            if not await self._ready(engine):
                return
            watchers += [asyncio.create_task(self._keep(child)) for child in fronts]
            for child in fronts:
                if not await self._ready(child):
                    return
            if options.metrics_port is not None:
                self.metrics.children = self.children
                metrics_port = self.metrics.serve(options.host, options.metrics_port)
                print(f"bertstream metrics on {options.host}:{metrics_port}", flush=True)
            if options.http_port:
                print(f"bertstream HTTP on {options.host}:{options.http_port}", flush=True)
            log.info("%d front-end processes and one engine process (pids %s)",
                     len(fronts), ", ".join(f"{c.name} {c.proc.pid}" for c in self.children
                                            if c.proc is not None))
            print(f"bertstream serving on {options.host}:{port}", flush=True)
            await self._stop_asked.wait()
        finally:
            self.stopping = True  # from here no child is started again
            for task in watchers:
                task.cancel()
            await self._stop(fronts)  # first: their calls in flight need the engine
            await self._stop([engine])

    async def _ready(self, child: Child) -> bool:
        """Wait until a child serves (True), or a stop is asked (False); exit if it cannot
        start at all."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not child.ready.is_set():
            if self._stop_asked.is_set():
                return False
            if time.monotonic() > deadline or child.crash_looping:
                raise SystemExit(f"bertstream-server: the {child.name} process does not start "
                                 "(see its log above)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.ready.wait(), 0.5)
        return True

    async def _keep(self, child: Child) -> None:
        """Start a child and start it again whenever it dies, backing off when it keeps
        dying."""
        while True:
            await child.start()
            assert child.proc is not None
            exited = asyncio.ensure_future(child.proc.wait())
            if child.crash_looping:  # health says so until it serves again
                ready = asyncio.ensure_future(child.ready.wait())
                await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                self._write_processes()
            code = await exited
            child.ready.clear()  # it no longer serves: health and metrics must not say it does
            if self.stopping:
                return
            child.deaths.append(time.monotonic())
            self.metrics.restarted(child.name)
            if child.crash_looping:
                log.error("%s exited %d times in %.0f s (last: %s); next start in %.0f s",
                          child.name, CRASH_LOOP, CRASH_WINDOW_S, _exit_reason(code),
                          self.options.restart_backoff_s)
                self._write_processes()
                await asyncio.sleep(self.options.restart_backoff_s)
            else:
                log.error("%s exited (%s); starting it again", child.name, _exit_reason(code))
                await asyncio.sleep(RESTART_DELAY_S)

    def _write_processes(self) -> None:
        """What health reports about the processes (front ends read the file)."""
        looping = [c.name for c in self.children if c.crash_looping and not c.ready.is_set()]
        path = self.run_dir / PROCESSES_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"crash_looping": looping}), "utf-8")
        os.replace(tmp, path)

    async def _stop(self, children: list[Child]) -> None:
        live = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                await asyncio.wait_for(proc.wait(), self.options.grace_period_s + STOP_EXTRA_S)
            except TimeoutError:
                log.error("process %d did not stop; killing it", proc.pid)
                proc.kill()
                await proc.wait()


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@contextlib.contextmanager
def _reserve_port(host: str, port: int):  # type: ignore[no-untyped-def]
    """Bind (without listening) with SO_REUSEPORT so front ends can share the port, after
    checking no other server listens there."""
    if port:
        ports.check_free(host, port)
    sock = ports.bind(host, port, shared=True)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def supervise(options: SupervisorOptions) -> None:
    await Supervisor(options).run()
