"""The composition root: flags -> options -> manager, pipeline, servicers -> a running server.

Nothing below this module reads flags or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from bertstream.v1 import bertstream_pb2, bertstream_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import repository
from .decoding import DecodeGuard
from .errors import BertstreamError
from .fakedevice import parse_spec
from .health import publish_health
from .inference import Limits, Pipeline
from .lifecycle import ModelManager
from .loader import OnnxLoader
from .metrics import Metrics
from .runtime import RuntimeOptions, usable_cores
from .security import AuthInterceptor, TokenTable, server_credentials
from .servicer import BertServicer
from .shutdown import CLOSE_GRACE_S, ShutdownGate
from .stages import CLOCK, StageTiming
from .watcher import StabilityTracker
from .workers import Workers

__all__ = ["ServerOptions", "main", "serve"]

log = logging.getLogger("bertstream.server")
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    model_repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    port: int = 8001
    default_model: str = ""
    model_control_mode: str = "none"  # none | poll | explicit
    repository_poll_s: float = 5.0
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*": all)
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: a free port
    grace_period_s: float = 30.0
    tls_cert: Path | None = None  # with tls_key: TLS on the gRPC port
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients need a certificate from this CA
    auth: TokenTable | None = None  # None: no token asked
    stream_window: int = 32
    max_receive_mb: int = 64
    limits: Limits = field(default_factory=Limits)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    stage_timing: bool = False  # per-stage CPU clocks (stages.py), for benchmarks


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    p = argparse.ArgumentParser(prog="bertstream-server", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one")
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
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--intra-op-threads", type=int, default=0, help="0: the cores available")
    p.add_argument("--intra-op-spinning", choices=["on", "off"], default="off",
                   help="let onnxruntime's threads spin-wait between batches (default off: "
                   "spinning takes the cores that tokenize and serve gRPC)")
    # Benchmarks only (benchmarks/bench.py): not part of the user-facing surface.
    p.add_argument("--fake-device", default="", help=argparse.SUPPRESS)
    p.add_argument("--stage-timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-texts-per-request", type=int, default=Limits.max_texts_per_request)
    p.add_argument("--max-text-chars", type=int, default=Limits.max_text_chars)
    p.add_argument("--max-request-chars", type=int, default=Limits.max_request_chars,
                   help="characters in all texts of one message together")
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
    if a.fake_device:
        try:
            parse_spec(a.fake_device)
        except ValueError as exc:
            p.error(str(exc))
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ServerOptions(
        model_repository=a.model_repository, host=a.host, port=a.port,
        default_model=a.default_model, model_control_mode=a.model_control_mode,
        repository_poll_s=a.repository_poll_secs, load_models=tuple(a.load_model),
        metrics_port=a.metrics_port, grace_period_s=a.grace_period,
        tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca, auth=auth,
        stream_window=a.stream_window,
        limits=Limits(a.max_texts_per_request, a.max_text_chars, a.max_request_chars),
        runtime=RuntimeOptions(device=a.device, gpu_id=a.gpu_id,
                               intra_op_threads=a.intra_op_threads,
                               intra_op_spinning=a.intra_op_spinning == "on",
                               fake_device=a.fake_device),
        stage_timing=a.stage_timing,
    )


def _freeze_startup_objects() -> None:
    """Move what start-up built (modules, protobuf descriptors, sessions, tokenizers) out of
    the cyclic garbage collector's reach: it lives as long as the process, and full passes
    over it took a fifth of the event loop's time at a few thousand texts per second."""
    gc.collect()
    gc.freeze()


async def serve(options: ServerOptions) -> None:
    """Load the repository, serve until SIGTERM/SIGINT, then drain and return."""
    # One tokenizer thread per core does the parallel work (TEI's rule); tokenizers' own rayon
    # pool on top of it would oversubscribe the cores and hide its CPU from the stage budget.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    health_servicer = health.aio.HealthServicer()
    serving = False

    async def on_change() -> None:
        await publish_health(health_servicer, manager.snapshot, serving=serving)

    metrics = Metrics()
    loader = OnnxLoader(options.runtime, options.model_repository, metrics)
    manager = ModelManager(options.model_repository, loader, options.default_model,
                           on_change=on_change, metrics=metrics)
    await _initial_load(manager, options)
    # One tokenizer thread per core this process may use (its affinity, not the machine's).
    tokenize_pool = Workers(max(2, usable_cores()), "tokenize")
    pipeline = Pipeline(manager, options.limits, tokenize_pool)

    gate = ShutdownGate()  # counts running calls; refuses new ones once draining
    interceptors: list[grpc.aio.ServerInterceptor] = [gate, DecodeGuard()]
    if options.auth:  # first: a refused call never reaches the decode guard or a servicer
        interceptors.insert(0, AuthInterceptor(options.auth))
    if options.stage_timing:  # outermost, so it times the (de)serializers grpc really calls
        CLOCK.enabled = True
        interceptors.insert(0, StageTiming())
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", options.max_receive_mb * MiB),
        ("grpc.max_send_message_length", 4 * options.max_receive_mb * MiB),
    ])
    draining = gate.draining  # set on SIGTERM: streams stop reading and end after answering
    bertstream_pb2_grpc.add_BertServiceServicer_to_server(
        BertServicer(pipeline, options.stream_window, options.model_control_mode, metrics,
                     draining), server)
    # Imported here: the KServe stubs register `inference.*` in protobuf's default pool, as
    # tritonclient does, and processes that import this module (tests) may also use tritonclient.
    from .kserve import KServeServicer, add_to_server

    kserve_service = add_to_server(
        KServeServicer(pipeline, options.stream_window, options.model_control_mode, metrics,
                       draining), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([
        bertstream_pb2.DESCRIPTOR.services_by_name["BertService"].full_name,
        kserve_service,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ], server)
    bind = f"{options.host}:{options.port}"
    if options.tls_cert and options.tls_key:
        port = server.add_secure_port(bind, server_credentials(
            options.tls_cert, options.tls_key, options.tls_client_ca))
        log.info("TLS on the gRPC port%s", ", client certificates required"
                 if options.tls_client_ca else "")
    else:
        port = server.add_insecure_port(bind)
    if options.auth:
        log.info("bearer tokens required (%d configured); health stays open",
                 len(options.auth.entries))
        if not options.tls_cert:
            log.warning("bearer tokens over plaintext gRPC: anyone on the path can read them; "
                        "add --tls-cert/--tls-key unless a TLS proxy or mesh fronts this port")
    if port == 0:
        raise SystemExit(f"cannot bind {options.host}:{options.port}")
    await server.start()
    _freeze_startup_objects()
    serving = True
    await publish_health(health_servicer, manager.snapshot, serving=True)
    for model in manager.snapshot.models:
        for row in model.versions:
            log.info("model %s version %d: %s %s", model.name, row.version, row.state.name,
                     row.reason)
        if model.error:
            log.error("model %s: %s", model.name, model.error)
    if options.metrics_port is not None:
        metrics_port = metrics.serve(options.host, options.metrics_port)
        print(f"bertstream metrics on {options.host}:{metrics_port}", flush=True)
    if options.runtime.fake_device:
        log.warning("fake device %r: no model computes, vectors and labels are made up "
                    "(benchmarks only)", options.runtime.fake_device)
    # Tests and scripts wait for this exact line; it carries the bound port.
    print(f"bertstream serving on {options.host}:{port}", flush=True)
    poller = None
    if options.model_control_mode == "poll":
        poller = asyncio.create_task(_poll(manager, options))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new calls, %.0fs for in-flight ones", options.grace_period_s)
    if poller is not None:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    await health_servicer.enter_graceful_shutdown()
    # Running calls end before any connection closes (see shutdown.py for why).
    grace_left = 0.0
    try:
        grace_left = await gate.drain(options.grace_period_s)
        if gate.running:
            log.warning("grace period over: cancelling %d calls still running", gate.running)
    finally:
        await server.stop(min(grace_left, CLOSE_GRACE_S))
        await manager.close()
        tokenize_pool.close()


async def _initial_load(manager: ModelManager, options: ServerOptions) -> None:
    if options.model_control_mode != "explicit":
        await manager.load_all()
        return
    names = options.load_models
    if "*" in names:
        names = tuple(repository.scan(options.model_repository))
    for name in names:
        try:
            await manager.load_model(name)
        except BertstreamError as exc:  # the server starts anyway; ListModels says why
            log.error("--load-model %s: %s", name, exc)


async def _poll(manager: ModelManager, options: ServerOptions) -> None:
    """Poll mode: rescan every --repository-poll-secs and let the manager follow the folder.
    A scan that fails (the repository is being moved, say) is logged and retried."""
    tracker = StabilityTracker(quiet_s=options.repository_poll_s)
    while True:
        await asyncio.sleep(options.repository_poll_s)
        try:
            entries = await asyncio.to_thread(repository.scan, options.model_repository)
            await manager.sync(entries, stable=tracker.stable)
            tracker.forget({path for e in entries.values() for path in e.versions.values()})
        except Exception:
            log.exception("repository poll failed; trying again in %.1fs",
                          options.repository_poll_s)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    if not options.model_repository.is_dir():
        sys.exit(f"bertstream-server: model repository {options.model_repository} is not a folder")
    asyncio.run(serve(options))
