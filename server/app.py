"""The composition root: flags -> options -> manager, pipeline, servicers -> a running server.

Nothing below this module reads flags or the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
from bertstream.v1 import bertstream_pb2, bertstream_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.decoding import DecodeGuard
from .api.health import NOT_SERVING, PROCESSES_SERVICE, SERVING, publish_health
from .api.http.common import HttpContext
from .api.http.server import HttpServer
from .api.security import AuthInterceptor, server_credentials
from .api.servicer import BertServicer
from .api.shutdown import CLOSE_GRACE_S, ShutdownGate
from .api.timing import StageTiming
from .api.traced import TracingInterceptor
from .engine.backends.base import usable_cores
from .engine.loader import OnnxLoader, pin_mmap_threshold
from .engine.workers import Workers
from .metrics import Metrics
from .options import ServerOptions, parse_args
from .pipeline.inference import Pipeline
from .processes.engine_process import Engine
from .processes.frontend_process import EngineModels
from .processes.supervisor import PROCESSES_FILE, SupervisorOptions, supervise
from .repository.control import ExplicitMemory, initial_load, poll
from .repository.manager import ModelManager
from .repository.models import Models
from .stages import CLOCK
from .tracing import TRACE

__all__ = ["main", "serve"]

log = logging.getLogger("bertstream.server")
MiB = 1024 * 1024


def _freeze_startup_objects() -> None:
    """Move what start-up built (modules, protobuf descriptors, sessions, tokenizers) out of
    the cyclic garbage collector's reach: it lives as long as the process, and full passes
    over it took a fifth of the event loop's time at a few thousand texts per second."""
    gc.collect()
    gc.freeze()


async def serve(options: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return: as one process, as the supervisor
    of front ends and an engine (`--frontends N`), or as one of those."""
    # One tokenizer thread per core does the parallel work (TEI's rule); tokenizers' own rayon
    # pool on top of it would oversubscribe the cores and hide its CPU from the stage budget.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.role == "engine":
        await _traced(serve_engine(options), options, "engine")
    elif options.role == "frontend":
        await _traced(serve_frontend(options), options, f"frontend-{options.index}")
    elif options.frontends > 1:  # the supervisor serves no call: its children trace theirs
        await supervise(SupervisorOptions(
            host=options.host, port=options.port, http_port=options.http_port,
            metrics_port=options.metrics_port, frontends=options.frontends,
            grace_period_s=options.grace_period_s, restart_backoff_s=options.restart_backoff_s,
            argv=options.argv))
    else:
        await _traced(serve_single(options), options, "server")


async def _traced(serving: Coroutine[Any, Any, None], options: ServerOptions,
                  process: str) -> None:
    """Serve with OpenTelemetry traces when asked (tracing.py); the spans still queued are
    sent when the process stops."""
    if not options.trace.endpoint:
        await serving
        return
    TRACE.configure(options.trace, process)
    if options.role != "frontend":  # one process says it
        log.info("tracing to %s: %g of calls without a caller's traceparent sampled",
                 options.trace.endpoint, options.trace.rate)
    try:
        await serving
    finally:
        TRACE.close()


async def serve_single(options: ServerOptions) -> None:
    """Everything in this process: models, batchers, sessions and the gRPC front."""
    metrics = Metrics()
    loader = OnnxLoader(options.runtime, metrics)
    manager = ModelManager(options.model_repository, loader, options.default_model,
                           on_change=lambda: front.publish_health(), metrics=metrics)
    front = GrpcFront(options, metrics, manager)
    await initial_load(manager, options.model_control_mode, options.load_models,
                       options.model_repository)
    port = await front.start(tokenize_threads=usable_cores())
    if options.metrics_port is not None:
        metrics_port = metrics.serve(options.host, options.metrics_port)
        print(f"bertstream metrics on {options.host}:{metrics_port}", flush=True)
    _warn_fake_device(options)
    if front.http is not None:
        print(f"bertstream HTTP on {options.host}:{front.http.port}", flush=True)
    # Tests and scripts wait for this exact line; it carries the bound port.
    print(f"bertstream serving on {options.host}:{port}", flush=True)
    poller = _start_poll(manager, options)
    await _wait_for_signal((signal.SIGTERM, signal.SIGINT))
    await _cancel(poller)
    try:
        await front.stop()
    finally:
        await manager.close()


async def serve_engine(options: ServerOptions) -> None:
    """The engine process: models, batchers, sessions, control plane
    (processes/engine_process.py)."""
    assert options.run_dir is not None
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orders the shutdown
    metrics = Metrics()
    memory = ExplicitMemory(options.run_dir / "explicit-models.json")
    loader = OnnxLoader(options.runtime, metrics)

    async def on_change() -> None:
        await engine.on_change()

    manager = ModelManager(options.model_repository, loader, options.default_model,
                           on_change=on_change, metrics=metrics)
    engine = Engine(manager, on_control=lambda: memory.write(manager))
    remembered = memory.read()  # after a crash: what LoadModel / UnloadModel had left
    await initial_load(manager, options.model_control_mode,
                       options.load_models if remembered is None else remembered,
                       options.model_repository)
    if options.model_control_mode == "explicit":
        memory.write(manager)
    await engine.listen(options.run_dir / ENGINE_SOCKET)
    _freeze_startup_objects()
    if options.stage_timing:
        CLOCK.enabled = True
    _report(options, metrics)
    _warn_fake_device(options)
    poller = _start_poll(manager, options)
    await _wait_for_signal((signal.SIGTERM,))
    await _cancel(poller)
    try:
        await asyncio.wait_for(manager.close(), options.grace_period_s)
    except TimeoutError:
        log.warning("engine: versions still leased after the grace period; stopping anyway")
    await engine.close()


async def serve_frontend(options: ServerOptions) -> None:
    """A front-end process: gRPC, validation, tokenization and responses
    (processes/frontend_process.py)."""
    assert options.run_dir is not None
    _die_with_parent()
    metrics = Metrics()
    models = EngineModels(options.run_dir / ENGINE_SOCKET, options.model_repository,
                          f"frontend-{options.index}", options.default_model,
                          on_change=lambda: front.publish_health())
    front = GrpcFront(options, metrics, models, reuse_port=True)
    models.start()
    await models.first_snapshot.wait()
    await front.start(tokenize_threads=max(2, usable_cores() // options.frontends))
    watch = asyncio.create_task(front.watch_processes(options.run_dir / PROCESSES_FILE))
    _report(options, metrics)
    await _wait_for_signal((signal.SIGTERM, signal.SIGINT))
    await _cancel(watch)
    try:
        await front.stop()
    finally:
        await models.close()


ENGINE_SOCKET = "engine.sock"


class GrpcFront:
    """The gRPC (and HTTP) server over some `Models` (a `ModelManager`, or the engine's as a
    front end sees them): servicers, interceptors, health, the port, the drain on SIGTERM."""

    def __init__(self, options: ServerOptions, metrics: Metrics, models: Models,
                 reuse_port: bool = False) -> None:
        self.options = options
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.models = models
        self.health = health.aio.HealthServicer()
        self.serving = False
        self.gate = ShutdownGate()  # counts running calls; refuses new ones once draining
        self.server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self._pool: Workers | None = None

    async def publish_health(self) -> None:
        connected = self.models.connected
        await publish_health(self.health, self.models.snapshot,
                             serving=self.serving and connected)

    async def watch_processes(self, path: Path) -> None:
        """Health's `bertstream.processes`: NOT_SERVING while the supervisor reports a
        process that keeps dying (supervisor.py writes the file)."""
        looping: list[str] | None = None
        while True:
            try:
                now = json.loads(path.read_text("utf-8")).get("crash_looping", [])
            except (OSError, ValueError):
                now = []
            if now != looping:
                looping = now
                await self.health.set(PROCESSES_SERVICE, NOT_SERVING if now else SERVING)
            await asyncio.sleep(1.0)

    async def start(self, tokenize_threads: int) -> int:
        """Bind and start; returns the bound port."""
        options = self.options
        # One tokenizer thread per core this process may use (its affinity, not the machine's).
        self._pool = Workers(max(2, tokenize_threads), "tokenize")
        pipeline = Pipeline(self.models, options.limits, self._pool)
        interceptors: list[grpc.aio.ServerInterceptor] = [self.gate, DecodeGuard()]
        if options.auth:  # first: a refused call never reaches the decode guard or a servicer
            interceptors.insert(0, AuthInterceptor(options.auth))
        if options.stage_timing:  # outermost, so it times the (de)serializers grpc really calls
            CLOCK.enabled = True
            interceptors.insert(0, StageTiming())
        if TRACE.on:  # outermost: a refused call's span says so
            interceptors.insert(0, TracingInterceptor())
        server = self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", options.max_receive_mb * MiB),
            ("grpc.max_send_message_length", 4 * options.max_receive_mb * MiB),
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            *options.grpc_limits.server_options(),
        ])
        draining = self.gate.draining  # set on SIGTERM: streams stop reading, end after answering
        bertstream_pb2_grpc.add_BertServiceServicer_to_server(
            BertServicer(pipeline, options.stream_window, options.model_control_mode,
                         self.metrics, draining), server)
        # Imported here: the KServe stubs register `inference.*` in protobuf's default pool, as
        # tritonclient does, and processes that import this module (tests) may also use
        # tritonclient.
        from .api.kserve import KServeServicer, add_to_server

        kserve_service = add_to_server(
            KServeServicer(pipeline, options.stream_window, options.model_control_mode,
                           self.metrics, draining), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([
            bertstream_pb2.DESCRIPTOR.services_by_name["BertService"].full_name,
            kserve_service,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ], server)
        port = self._bind(server)
        await server.start()
        if options.http_port:
            self.http = HttpServer(
                HttpContext(pipeline, self.metrics, options.model_control_mode, draining,
                            options.max_receive_mb * MiB, options.auth,
                            body_timeout_s=options.http_limits.body_timeout_s),
                options.host, options.http_port, options.tls_cert, options.tls_key,
                options.tls_client_ca, shared=self.reuse_port, limits=options.http_limits)
            await self.http.start()
        _freeze_startup_objects()
        self.serving = True
        await self.publish_health()
        if options.index == 0:  # one process says it
            self._log_models()
        return port

    def _bind(self, server: grpc.aio.Server) -> int:
        options = self.options
        bind = f"{options.host}:{options.port}"
        if options.tls_cert and options.tls_key:
            port = server.add_secure_port(bind, server_credentials(
                options.tls_cert, options.tls_key, options.tls_client_ca))
            if options.index == 0:
                log.info("TLS on the gRPC%s port%s", " and HTTP" if options.http_port else "",
                         ", client certificates required" if options.tls_client_ca else "")
        else:
            port = server.add_insecure_port(bind)
        if options.auth and options.index == 0:
            log.info("bearer tokens required (%d configured); health stays open",
                     len(options.auth.entries))
            if not options.tls_cert:
                log.warning("bearer tokens over plaintext gRPC: anyone on the path can read "
                            "them; add --tls-cert/--tls-key unless a TLS proxy or mesh fronts "
                            "this port")
        if port == 0:
            raise SystemExit(f"cannot bind {options.host}:{options.port}")
        return port

    def _log_models(self) -> None:
        for model in self.models.snapshot.models:
            for row in model.versions:
                log.info("model %s version %d: %s %s", model.name, row.version,
                         row.state.name, row.reason)
            if model.error:
                log.error("model %s: %s", model.name, model.error)

    async def stop(self) -> None:
        """SIGTERM: refuse new calls, let running ones end (grace period), then close."""
        assert self.server is not None
        grace_s = self.options.grace_period_s
        log.info("stopping: no new calls, %.0fs for in-flight ones", grace_s)
        self.serving = False
        await self.health.enter_graceful_shutdown()
        # Running calls end before any connection closes (see shutdown.py for why).
        grace_left = 0.0
        try:
            grace_left = await self.gate.drain(grace_s)
            if self.gate.running:
                log.warning("grace period over: cancelling %d calls still running",
                            self.gate.running)
            if self.http is not None:  # the gate set `draining`: new HTTP requests get 503
                await self.http.drain(grace_left)
        finally:
            await self.server.stop(min(grace_left, CLOSE_GRACE_S))
            if self._pool is not None:
                self._pool.close()


def _report(options: ServerOptions, metrics: Metrics) -> None:
    """A child process tells the supervisor it serves, and where its metrics are."""
    assert options.status_fd is not None
    lines = ["ready"]
    if options.metrics_port is not None:
        lines.append(f"metrics {metrics.serve('127.0.0.1', 0)}")
    os.write(options.status_fd, ("\n".join(lines) + "\n").encode())


def _die_with_parent() -> None:
    """A child gets SIGTERM (and drains) if the supervisor dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _warn_fake_device(options: ServerOptions) -> None:
    if options.runtime.fake_device:
        log.warning("fake device %r: no model computes, vectors and labels are made up "
                    "(benchmarks only)", options.runtime.fake_device)


def _start_poll(manager: ModelManager, options: ServerOptions) -> asyncio.Task[None] | None:
    if options.model_control_mode != "poll":
        return None
    return asyncio.create_task(poll(manager, options.model_repository, options.repository_poll_s))


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _wait_for_signal(signals: tuple[signal.Signals, ...]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    pin_mmap_threshold()
    if not options.model_repository.is_dir():
        sys.exit(f"bertstream-server: model repository {options.model_repository} is not a folder")
    asyncio.run(serve(options))
