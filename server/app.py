"""The composition root: flags -> options -> manager, pipeline, servicers -> a running server.

Nothing below this module reads flags or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bertstream.v1 import bertstream_pb2, bertstream_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .control import ExplicitMemory, initial_load, poll
from .decoding import DecodeGuard
from .fakedevice import parse_spec
from .health import NOT_SERVING, PROCESSES_SERVICE, SERVING, publish_health
from .inference import Limits, Pipeline
from .lifecycle import ModelManager
from .loader import OnnxLoader, pin_mmap_threshold
from .metrics import Metrics
from .rest.common import HttpContext
from .rest.server import HttpServer
from .runtime import RuntimeOptions, usable_cores
from .security import AuthInterceptor, TokenTable, server_credentials
from .servicer import BertServicer
from .shutdown import CLOSE_GRACE_S, ShutdownGate
from .stages import CLOCK, StageTiming
from .supervisor import CRASH_BACKOFF_S, PROCESSES_FILE, supervise
from .workers import Workers

__all__ = ["ServerOptions", "main", "serve"]

log = logging.getLogger("bertstream.server")
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    model_repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    port: int = 8001
    http_port: int = 8000  # HTTP/JSON (server/rest); 0: off
    default_model: str = ""
    model_control_mode: str = "none"  # none | poll | explicit
    repository_poll_s: float = 5.0
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*": all)
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: a free port
    grace_period_s: float = 30.0
    tls_cert: Path | None = None  # with tls_key: TLS on the gRPC and HTTP ports
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients need a certificate from this CA
    auth: TokenTable | None = None  # None: no token asked
    stream_window: int = 32
    max_receive_mb: int = 64
    limits: Limits = field(default_factory=Limits)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    stage_timing: bool = False  # per-stage CPU clocks (stages.py), for benchmarks
    frontends: int = 1  # front-end processes; 1: everything in this one process
    restart_backoff_s: float = CRASH_BACKOFF_S  # a crash-looping process waits this long
    # Set by the supervisor on the processes it starts (supervisor.py), never by users.
    role: str = ""  # "" (single process or supervisor), "engine" or "frontend"
    run_dir: Path | None = None
    status_fd: int | None = None
    index: int = 0  # which front end
    argv: tuple[str, ...] = ()  # the command line, passed on to the processes it starts


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    p = argparse.ArgumentParser(prog="bertstream-server", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one")
    p.add_argument("--http-port", type=int, default=8000,
                   help="HTTP/JSON port: KServe v2 REST, OpenAI /v1/embeddings, TEI, "
                   "bert-as-service /encode (default 8000, Triton's; 0: no HTTP)")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="none",
                   help="none: load every model's policy versions at start; poll: also follow "
                   "the repository folder; explicit: only LoadModel / UnloadModel (and "
                   "--load-model) change what is served")
    p.add_argument("--repository-poll-secs", type=float, default=5.0,
                   help="poll mode: seconds between scans; a new version folder must also stay "
                   "unchanged this long before it is loaded")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="explicit mode: load this model at start (repeatable; '*' for all)")
    p.add_argument("--default-model", default="",
                   help="model for requests that name none (default: first ready by name)")
    p.add_argument("--frontends", type=int, default=0,
                   help="front-end processes sharing the port (protocol, tokenization, "
                   "responses) in front of one engine process (batches, sessions); 1 keeps "
                   "everything in one process; default 0: 1 without a GPU, else half the "
                   "cores up to 8")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--intra-op-threads", type=int, default=0, help="0: the cores available")
    p.add_argument("--cpu-engine", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="the engine for versions whose config.pbtxt names no backend, on a "
                   "CPU (with CUDA: onnxruntime): auto = OpenVINO where it is installed "
                   "(about twice as fast at bf16 where the CPU has it), else onnxruntime"),
    p.add_argument("--intra-op-spinning", choices=["on", "off"], default="off",
                   help="let onnxruntime's threads spin-wait between batches (default off: "
                   "spinning takes the cores that tokenize and serve gRPC)")
    # Benchmarks only (benchmarks/bench.py): not part of the user-facing surface.
    p.add_argument("--fake-device", default="", help=argparse.SUPPRESS)
    p.add_argument("--stage-timing", action="store_true", help=argparse.SUPPRESS)
    # The supervisor's children (supervisor.py).
    p.add_argument("--role", choices=["", "engine", "frontend"], default="",
                   help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    # Tests only: a shorter wait before a crash-looping process is started again.
    p.add_argument("--restart-backoff", type=float, default=CRASH_BACKOFF_S,
                   help=argparse.SUPPRESS)
    p.add_argument("--max-texts-per-request", type=int, default=Limits.max_texts_per_request)
    p.add_argument("--max-text-chars", type=int, default=Limits.max_text_chars)
    p.add_argument("--max-request-chars", type=int, default=Limits.max_request_chars,
                   help="characters in all texts of one message together")
    p.add_argument("--max-receive-mb", type=int, default=ServerOptions.max_receive_mb,
                   help="largest request in MiB: one gRPC message, or one HTTP body (refused "
                   "413 from its Content-Length before it is read, or as soon as a chunked "
                   "body passes it); gRPC may send 4 times this back (default 64)")
    p.add_argument("--stream-window", type=int, default=32,
                   help="messages of one stream in flight before the server stops reading")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free "
                   "port; default: off)")
    p.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM): serve TLS")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="mutual TLS: refuse clients without a certificate signed by this CA")
    p.add_argument("--auth-token-file", type=Path,
                   help="bearer tokens, 'scope:token' (scope inference or admin) separated by "
                   "whitespace; also read from $BERTSTREAM_AUTH_TOKENS. Health stays open")
    p.add_argument("--log-level", default=os.environ.get("BERTSTREAM_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    if (a.tls_cert is None) != (a.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key")
    for path in (a.tls_cert, a.tls_key, a.tls_client_ca, a.auth_token_file):
        if path is not None and not path.is_file():
            p.error(f"{path} is not a readable file")
    try:
        auth = TokenTable.load(a.auth_token_file, os.environ.get("BERTSTREAM_AUTH_TOKENS"))
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    if a.load_model and a.model_control_mode != "explicit":
        p.error("--load-model needs --model-control-mode explicit")
    if a.repository_poll_secs <= 0:
        p.error("--repository-poll-secs must be > 0")
    if a.frontends < 0:
        p.error("--frontends must be >= 0")
    if a.max_receive_mb < 1:
        p.error("--max-receive-mb must be >= 1")
    if a.role and (a.run_dir is None or a.status_fd is None):
        p.error("--role needs --run-dir and --status-fd")
    if a.fake_device:
        try:
            parse_spec(a.fake_device)
        except ValueError as exc:
            p.error(str(exc))
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ServerOptions(
        model_repository=a.model_repository, host=a.host, port=a.port, http_port=a.http_port,
        default_model=a.default_model, model_control_mode=a.model_control_mode,
        repository_poll_s=a.repository_poll_secs, load_models=tuple(a.load_model),
        metrics_port=a.metrics_port, grace_period_s=a.grace_period,
        tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca, auth=auth,
        stream_window=a.stream_window, max_receive_mb=a.max_receive_mb,
        limits=Limits(a.max_texts_per_request, a.max_text_chars, a.max_request_chars),
        runtime=RuntimeOptions(device=a.device, gpu_id=a.gpu_id,
                               intra_op_threads=a.intra_op_threads,
                               intra_op_spinning=a.intra_op_spinning == "on",
                               fake_device=a.fake_device, cpu_engine=a.cpu_engine),
        stage_timing=a.stage_timing,
        frontends=a.frontends or default_frontends(a.device, a.fake_device),
        restart_backoff_s=a.restart_backoff,
        role=a.role, run_dir=a.run_dir, status_fd=a.status_fd, index=a.index,
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )


def default_frontends(device: str, fake_device: str) -> int:
    """One process without a GPU (onnxruntime takes the cores; tokenization already runs on
    a thread per core); with one, half the cores up to 8, as the front end is then what
    keeps the card waiting."""
    if device == "cpu" and not fake_device:
        return 1
    gpu = bool(fake_device)
    if not gpu and device != "cpu":
        import onnxruntime as ort

        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    cores = usable_cores()
    return max(1, min(8, cores // 2)) if gpu and cores >= 4 else 1


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
        await serve_engine(options)
    elif options.role == "frontend":
        await serve_frontend(options)
    elif options.frontends > 1:
        await supervise(options)
    else:
        await serve_single(options)


async def serve_single(options: ServerOptions) -> None:
    """Everything in this process: models, batchers, sessions and the gRPC front."""
    metrics = Metrics()
    front = GrpcFront(options, metrics)
    loader = OnnxLoader(options.runtime, options.model_repository, metrics)
    manager = ModelManager(options.model_repository, loader, options.default_model,
                           on_change=front.publish_health, metrics=metrics)
    front.models = manager
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
    """The engine process: models, batchers, sessions, control plane (engine.py)."""
    from .engine import Engine

    assert options.run_dir is not None
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orders the shutdown
    metrics = Metrics()
    memory = ExplicitMemory(options.run_dir / "explicit-models.json")
    loader = OnnxLoader(options.runtime, options.model_repository, metrics)

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
    """A front-end process: gRPC, validation, tokenization and responses (frontend.py)."""
    from .frontend import EngineModels

    assert options.run_dir is not None
    _die_with_parent()
    metrics = Metrics()
    front = GrpcFront(options, metrics, reuse_port=True)
    models = EngineModels(options.run_dir / ENGINE_SOCKET, options.model_repository,
                          f"frontend-{options.index}", options.default_model,
                          on_change=front.publish_health)
    front.models = models
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
    """The gRPC server over some models (a `ModelManager`, or the engine's as a front end
    sees them): servicers, interceptors, health, the port, and the drain on SIGTERM."""

    def __init__(self, options: ServerOptions, metrics: Metrics, reuse_port: bool = False) -> None:
        self.options = options
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.models: Any = None
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
        server = self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", options.max_receive_mb * MiB),
            ("grpc.max_send_message_length", 4 * options.max_receive_mb * MiB),
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
        ])
        draining = self.gate.draining  # set on SIGTERM: streams stop reading, end after answering
        bertstream_pb2_grpc.add_BertServiceServicer_to_server(
            BertServicer(pipeline, options.stream_window, options.model_control_mode,
                         self.metrics, draining), server)
        # Imported here: the KServe stubs register `inference.*` in protobuf's default pool, as
        # tritonclient does, and processes that import this module (tests) may also use
        # tritonclient.
        from .kserve import KServeServicer, add_to_server

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
                            options.max_receive_mb * MiB, options.auth),
                options.host, options.http_port, options.tls_cert, options.tls_key,
                options.tls_client_ca, shared=self.reuse_port)
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
