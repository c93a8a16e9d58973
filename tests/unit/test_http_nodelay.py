"""The HTTP listener's connections have Nagle off: asyncio sets TCP_NODELAY only on sockets
whose proto says TCP, and an accepted socket copies the listener's. With Nagle on, every
response (headers, then body: two writes) waited ~40 ms for the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

import pytest
from bertstream.server.api.http.server import _listen


@pytest.mark.parametrize("shared", [False, True])  # one process; front ends sharing the port
def test_accepted_connections_have_tcp_nodelay(shared: bool) -> None:
    async def accept_one() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = _listen("127.0.0.1", 0, shared)
        assert listener.proto == socket.IPPROTO_TCP
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
        return nodelay

    assert asyncio.run(accept_one()) != 0
