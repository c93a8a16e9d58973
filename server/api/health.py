"""grpc.health.v1 for the server ("") and for each model (its name), so probes and
grpc-health-probe work unchanged."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from ..repository.snapshot import RepositorySnapshot

__all__ = ["NOT_SERVING", "PROCESSES_SERVICE", "SERVING", "publish_health"]

# "" is the server as a whole; the others are the gRPC services it serves, by full name.
SERVICES = ("", "bertstream.v1.BertService", "inference.GRPCInferenceService")
# Multi-process servers (--frontends N): NOT_SERVING while a process keeps dying.
PROCESSES_SERVICE = "bertstream.processes"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def publish_health(servicer: health.aio.HealthServicer, snapshot: RepositorySnapshot,
                         serving: bool) -> None:
    """Set the overall status and one status per model: SERVING when any version is READY
    (a model whose folder was removed answers NOT_SERVING)."""
    for name in snapshot.removed:
        await servicer.set(name, NOT_SERVING)
    for model in snapshot.models:
        await servicer.set(model.name, SERVING if serving and model.ready else NOT_SERVING)
    for service in SERVICES:
        await servicer.set(service, SERVING if serving else NOT_SERVING)
