"""The shutdown gate on a real grpc.aio server in this process: once draining, new calls are
refused UNAVAILABLE while probes still answer; running calls (unary and streaming) finish and
are counted until they end, also when their caller leaves; the drain returns what is left of
the grace period, or 0 when a call outlives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from bertstream.server.handlers import is_probe
from bertstream.server.shutdown import ShutdownGate
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class Service:
    """Raw-bytes methods that hold until the test releases them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.started.set()
        await self.release.wait()
        return b"done:" + request

    async def chat(self, requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            self.started.set()
            yield b"echo:" + request
            await self.release.wait()


async def _serve(gate: ShutdownGate, service: Service) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[gate])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Svc", {
        "Hold": grpc.unary_unary_rpc_method_handler(service.hold),
        "Chat": grpc.stream_stream_rpc_method_handler(service.chat),
    })])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_draining_refuses_new_calls_keeps_probes_and_waits_for_running_ones() -> None:
    async def main() -> None:
        gate, service = ShutdownGate(), Service()
        server, address = await _serve(gate, service)
        async with grpc.aio.insecure_channel(address) as channel:
            hold = channel.unary_unary("/t.Svc/Hold")
            running = asyncio.ensure_future(hold(b"a", timeout=30))
            await asyncio.wait_for(service.started.wait(), 10)
            assert gate.running == 1
            drain = asyncio.ensure_future(gate.drain(grace_s=20, linger_s=0.01))
            await asyncio.sleep(0.05)
            assert not drain.done()  # a call is running: the drain waits for it
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await hold(b"b", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            probe = health_pb2_grpc.HealthStub(channel)
            answer = await probe.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING  # not gated
            service.release.set()
            assert await running == b"done:a"  # the admitted call ran to its answer
            left = await asyncio.wait_for(drain, 10)
            assert 19 < left <= 20 and gate.running == 0
        await server.stop(left)

    asyncio.run(main())


def test_a_stream_counts_until_it_ends_even_when_its_caller_leaves() -> None:
    async def main() -> None:
        gate, service = ShutdownGate(), Service()
        server, address = await _serve(gate, service)
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_stream("/t.Svc/Chat")(timeout=30)
            await call.write(b"x")
            assert await call.read() == b"echo:x"
            assert gate.running == 1
            call.cancel()  # the caller leaves while the handler waits
            for _ in range(200):
                if gate.running == 0:
                    break
                await asyncio.sleep(0.01)
            assert gate.running == 0
            assert await asyncio.wait_for(gate.drain(grace_s=5, linger_s=0), 5) > 4
        await server.stop(0)

    asyncio.run(main())


def test_a_call_that_outlives_the_grace_period_leaves_no_grace() -> None:
    async def main() -> None:
        gate, service = ShutdownGate(), Service()
        server, address = await _serve(gate, service)
        async with grpc.aio.insecure_channel(address) as channel:
            running = asyncio.ensure_future(channel.unary_unary("/t.Svc/Hold")(b"a", timeout=30))
            await asyncio.wait_for(service.started.wait(), 10)
            assert await gate.drain(grace_s=0.2, linger_s=0) == 0.0
            await server.stop(0)  # no grace left: the running call is cancelled
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await running
            assert cancelled.value.code() in (grpc.StatusCode.CANCELLED,
                                              grpc.StatusCode.UNAVAILABLE)

    asyncio.run(main())


@pytest.mark.parametrize(("method", "probe"), [
    ("/grpc.health.v1.Health/Check", True),
    ("/grpc.health.v1.Health/Watch", True),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
    ("/inference.GRPCInferenceService/ServerReady", True),
    ("/inference.GRPCInferenceService/ModelInfer", False),
    ("/bertstream.v1.BertService/EmbedStream", False),
    ("/bertstream.v1.BertService/LoadModel", False),
])
def test_probes_are_health_reflection_and_readiness(method: str, probe: bool) -> None:
    assert is_probe(method) is probe
