"""`bertstream-server`'s flags -> one `ServerOptions`: the only place that reads the command line
and the environment. With app.py it is the composition root, so it may name every part's options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .api.grpc_connections import GrpcConnectionLimits
from .api.http.connections import ConnectionLimits
from .api.security import TokenTable
from .engine.backends.base import RuntimeOptions, usable_cores
from .engine.backends.fake import parse_spec
from .pipeline.inference import Limits
from .processes.supervisor import CRASH_BACKOFF_S
from .tracing import TraceOptions, tracing_installed

__all__ = ["ServerOptions", "default_frontends", "parse_args"]


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
    http_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    grpc_limits: GrpcConnectionLimits = field(default_factory=GrpcConnectionLimits)
    limits: Limits = field(default_factory=Limits)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    stage_timing: bool = False  # per-stage CPU clocks (stages.py), for benchmarks
    trace: TraceOptions = field(default_factory=TraceOptions)  # OpenTelemetry (tracing.py)
    frontends: int = 1  # front-end processes; 1: everything in this one process
    restart_backoff_s: float = CRASH_BACKOFF_S  # a crash-looping process waits this long
    # Set by the supervisor on the processes it starts (supervisor.py), never by users.
    role: str = ""  # "" (single process or supervisor), "engine" or "frontend"
    run_dir: Path | None = None
    status_fd: int | None = None
    index: int = 0  # which front end
    argv: tuple[str, ...] = ()  # the command line, passed on to the processes it starts


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    p = argparse.ArgumentParser(
        prog="bertstream-server",
        description="Serve BERT embeddings and classification from a model repository over "
        "gRPC (bertstream.v1, KServe v2) and HTTP.")
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
    p.add_argument("--max-texts-in-flight-per-client", type=int,
                   default=Limits.max_client_texts,
                   help="texts one client (its bearer token, else its host) may have in flight "
                   "at once, over every model and connection; the excess is refused at once "
                   "(RESOURCE_EXHAUSTED / 429 with Retry-After). Default 0: no cap")
    p.add_argument("--max-receive-mb", type=int, default=ServerOptions.max_receive_mb,
                   help="largest request in MiB: one gRPC message, or one HTTP body (refused "
                   "413 from its Content-Length before it is read, or as soon as a chunked "
                   "body passes it); gRPC may send 4 times this back (default 64)")
    http, rpc = ConnectionLimits(), GrpcConnectionLimits()
    limits = p.add_argument_group("connection limits (docs/operators.md says why each default)")
    limits.add_argument("--http-max-connections", type=int, default=http.max_connections,
                        help="open HTTP connections per front-end process; a new one beyond "
                        "it is answered 503 with Retry-After and closed")
    limits.add_argument("--http-header-timeout", type=float, default=http.head_timeout_s,
                        help="seconds a request head may take to arrive whole (408 and close)")
    limits.add_argument("--http-body-timeout", type=float, default=http.body_timeout_s,
                        help="seconds a request body may pause between two pieces (408)")
    limits.add_argument("--http-keepalive-timeout", type=float,
                        default=http.keepalive_timeout_s,
                        help="seconds an idle keep-alive connection stays open")
    limits.add_argument("--grpc-max-connection-age", type=float,
                        default=rpc.max_connection_age_s,
                        help="seconds before a gRPC connection is asked to reconnect (GOAWAY), so "
                        "round_robin clients find new replicas; 0: never")
    limits.add_argument("--grpc-max-connection-age-grace", type=float,
                        default=rpc.max_connection_age_grace_s,
                        help="seconds calls in flight get after that before the connection "
                        "closes; default 0: they finish however long they take (the bulk feed "
                        "resumes a cut stream; other stream clients may not)")
    limits.add_argument("--grpc-max-connection-idle", type=float,
                        default=rpc.max_connection_idle_s,
                        help="seconds a gRPC connection without calls stays open; 0: no limit")
    limits.add_argument("--grpc-min-ping-interval", type=float,
                        default=rpc.min_ping_interval_s,
                        help="a client pinging more often than this without calls is sent "
                        "GOAWAY")
    limits.add_argument("--grpc-max-concurrent-streams", type=int,
                        default=rpc.max_concurrent_streams,
                        help="calls and streams one gRPC connection may have open at once")
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
    p.add_argument("--trace-endpoint", default="", metavar="HOST:PORT",
                   help="send OpenTelemetry traces over OTLP/gRPC to this collector, Jaeger or "
                   "Tempo (HOST:PORT in plaintext, or http://... / https://...); default: "
                   "no tracing, at no cost")
    p.add_argument("--trace-rate", type=float, default=None, metavar="R",
                   help="fraction of calls traced among those whose caller sent no W3C "
                   "traceparent; a caller's sampled trace is always continued, an unsampled "
                   f"one never (default {TraceOptions.rate})")
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
    if a.max_texts_in_flight_per_client < 0:
        p.error("--max-texts-in-flight-per-client must be >= 0")
    for flag in ("http_max_connections", "grpc_max_concurrent_streams"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("http_header_timeout", "http_body_timeout", "http_keepalive_timeout",
                 "grpc_min_ping_interval"):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    for flag in ("grpc_max_connection_age", "grpc_max_connection_age_grace",
                 "grpc_max_connection_idle"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    if a.trace_rate is not None and not a.trace_endpoint:
        p.error("--trace-rate needs --trace-endpoint")
    if a.trace_rate is not None and not 0.0 <= a.trace_rate <= 1.0:
        p.error("--trace-rate must be between 0 and 1")
    if a.trace_endpoint and not tracing_installed():
        p.error("--trace-endpoint needs OpenTelemetry: pip install 'bertstream[tracing]'")
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
        http_limits=ConnectionLimits(a.http_max_connections, a.http_header_timeout,
                                     a.http_body_timeout, a.http_keepalive_timeout),
        grpc_limits=GrpcConnectionLimits(
            max_connection_age_s=a.grpc_max_connection_age,
            max_connection_age_grace_s=a.grpc_max_connection_age_grace,
            max_connection_idle_s=a.grpc_max_connection_idle,
            min_ping_interval_s=a.grpc_min_ping_interval,
            max_concurrent_streams=a.grpc_max_concurrent_streams),
        limits=Limits(a.max_texts_per_request, a.max_text_chars, a.max_request_chars,
                      a.max_texts_in_flight_per_client),
        runtime=RuntimeOptions(device=a.device, gpu_id=a.gpu_id,
                               intra_op_threads=a.intra_op_threads,
                               intra_op_spinning=a.intra_op_spinning == "on",
                               fake_device=a.fake_device, cpu_engine=a.cpu_engine),
        stage_timing=a.stage_timing,
        trace=TraceOptions(a.trace_endpoint, TraceOptions.rate if a.trace_rate is None
                           else a.trace_rate),
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
