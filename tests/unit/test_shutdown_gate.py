"""The shutdown gate on a real grpc.aio server in this process: once draining, new calls are
refused UNAVAILABLE while probes still answer; running calls (unary, generator streams and
context.write streams) finish and are counted until they end, also when their caller leaves;
the drain returns what is left of the grace period, or 0 when a call outlives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from bertstream.server.api.handlers import is_probe
from bertstream.server.api.shutdown import ShutdownGate
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

    async def write(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """A response stream written with context.write, as grpc's own Health.Watch is."""
        await context.write(b"first:" + request)
        self.started.set()
        await self.release.wait()
        await context.write(b"last:" + request)


async def _with_server(test: Callable[[ShutdownGate, Service, grpc.aio.Channel],
                                      Awaitable[None]]) -> None:
    gate, service = ShutdownGate(), Service()
    server = grpc.aio.server(interceptors=[gate])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Svc", {
        "Hold": grpc.unary_unary_rpc_method_handler(service.hold),
        "Chat": grpc.stream_stream_rpc_method_handler(service.chat),
        "Write": grpc.unary_stream_rpc_method_handler(service.write),
    })])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(test(gate, service, channel), 30)
    finally:  # also on failure: a server left running keeps pytest from exiting
        service.release.set()
        await server.stop(0)


async def _until_idle(gate: ShutdownGate) -> None:
    for _ in range(500):
        if gate.running == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gate.running} calls still counted")


def test_draining_refuses_new_calls_keeps_probes_and_waits_for_running_ones() -> None:
    async def test(gate: ShutdownGate, service: Service, channel: grpc.aio.Channel) -> None:
        hold = channel.unary_unary("/t.Svc/Hold")
        running = asyncio.ensure_future(hold(b"a", timeout=20))
        await asyncio.wait_for(service.started.wait(), 10)
        assert gate.running == 1
        drain = asyncio.ensure_future(gate.drain(grace_s=20, linger_s=0.01))
        await asyncio.sleep(0.05)
        assert not drain.done()  # a call is running: the drain waits for it
        for refused_call in (hold(b"b", timeout=2),
                             channel.stream_stream("/t.Svc/Chat")(iter([b"c"]), timeout=2).read()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await refused_call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
        probe = health_pb2_grpc.HealthStub(channel)
        answer = await probe.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING  # not gated
        await asyncio.sleep(0.2)
        service.release.set()
        assert await running == b"done:a"  # the admitted call ran to its answer
        left = await asyncio.wait_for(drain, 10)
        assert 15 < left < 19.8 and gate.running == 0  # the time waited is taken off

    asyncio.run(_with_server(test))


def test_streams_count_until_they_end_even_when_their_caller_leaves() -> None:
    async def test(gate: ShutdownGate, service: Service, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream("/t.Svc/Chat")(timeout=20)
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        written = channel.unary_stream("/t.Svc/Write")(b"y", timeout=20)
        assert await written.read() == b"first:y"
        await asyncio.wait_for(service.started.wait(), 10)
        assert gate.running == 2
        call.cancel()  # the callers leave while the handlers wait
        written.cancel()
        await _until_idle(gate)
        assert await asyncio.wait_for(gate.drain(grace_s=5, linger_s=0), 5) > 4

    asyncio.run(_with_server(test))


def test_a_context_write_stream_is_answered_in_full_before_the_drain_ends() -> None:
    async def test(gate: ShutdownGate, service: Service, channel: grpc.aio.Channel) -> None:
        written = channel.unary_stream("/t.Svc/Write")(b"z", timeout=20)
        assert await written.read() == b"first:z"
        drain = asyncio.ensure_future(gate.drain(grace_s=10, linger_s=0))
        await asyncio.sleep(0.05)
        assert gate.running == 1 and not drain.done()
        service.release.set()
        assert await written.read() == b"last:z"
        assert await written.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(drain, 5) > 9

    asyncio.run(_with_server(test))


def test_a_unary_call_whose_caller_leaves_stops_counting() -> None:
    async def test(gate: ShutdownGate, service: Service, channel: grpc.aio.Channel) -> None:
        running = channel.unary_unary("/t.Svc/Hold")(b"a", timeout=20)
        await asyncio.wait_for(service.started.wait(), 10)
        assert gate.running == 1
        running.cancel()
        await _until_idle(gate)

    asyncio.run(_with_server(test))


def test_a_call_that_outlives_the_grace_period_leaves_no_grace() -> None:
    async def test(gate: ShutdownGate, service: Service, channel: grpc.aio.Channel) -> None:
        running = asyncio.ensure_future(channel.unary_unary("/t.Svc/Hold")(b"a", timeout=20))
        await asyncio.wait_for(service.started.wait(), 10)
        assert await gate.drain(grace_s=0.2, linger_s=0) == 0.0
        assert gate.running == 1
        running.cancel()

    asyncio.run(_with_server(test))


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
