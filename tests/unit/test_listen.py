"""Where to open the server, from the address it listens on."""

from __future__ import annotations

import asyncio
import socket

from openelm_server.listen import bind_socket, where_to_open


def test_where_to_open():
    assert where_to_open("127.0.0.1", 8000) == ["open http://127.0.0.1:8000 (Press CTRL+C to quit)"]
    assert where_to_open("::1", 8000) == ["open http://[::1]:8000 (Press CTRL+C to quit)"]
    lines = where_to_open("0.0.0.0", 6006)
    assert lines[0] == "open http://127.0.0.1:6006 on this machine (Press CTRL+C to quit)"
    assert "AutoDL" in lines[-1] and "6006" in lines[-1]
    assert where_to_open("::", 7000)[0].startswith("open http://[::1]:7000")
    assert not any("AutoDL" in line for line in where_to_open("0.0.0.0", 7000))


def test_accepted_connections_send_small_writes_at_once():
    """uvicorn accepts on our socket through asyncio, which turns Nagle's algorithm off only for a
    socket that says TCP; with it on, a kept-alive connection's next response waits ~40 ms for the
    client's delayed acknowledgement."""
    listener = bind_socket("127.0.0.1", 0)
    listener.listen()
    accepted = []

    async def serve_one() -> None:
        loop = asyncio.get_running_loop()
        connected = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                connected.set_result(None)
                transport.close()

        server = await loop.create_server(Accept, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        await connected
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(serve_one())
    assert accepted and accepted[0] != 0
