"""link.memory: connections in memory behave as the link's ends expect of TCP."""

import asyncio

import pytest

from uplimit.link.memory import HOST, MemoryNetwork


def test_bytes_arrive_in_order_and_a_close_is_end_of_file():
    async def main():
        net = MemoryNetwork()
        got: list[bytes] = []

        async def echo(reader, writer):
            while data := await reader.read(100):
                got.append(data)
                writer.write(data.upper())
            writer.close()

        server = await net.start_server(echo, HOST)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await net.open_connection(HOST, port)
        assert writer.get_extra_info("peername") == (HOST, port)
        writer.write(b"abc")
        writer.write(b"def")
        await writer.drain()
        assert await reader.readexactly(6) == b"ABCDEF"
        writer.close()
        await writer.wait_closed()
        assert await reader.read() == b""  # ours closed: nothing more
        writer.write(b"late")  # dropped, as on a closed connection
        await asyncio.sleep(0)
        assert b"".join(got) == b"abcdef"

    asyncio.run(main())


def test_nothing_listening_is_refused_like_tcp():
    async def main():
        net = MemoryNetwork()
        with pytest.raises(ConnectionRefusedError):
            await net.open_connection(HOST, 1)
        server = await net.start_server(lambda r, w: asyncio.sleep(0), HOST, 7)
        with pytest.raises(OSError):
            await net.start_server(lambda r, w: asyncio.sleep(0), HOST, 7)
        server.close()
        with pytest.raises(ConnectionRefusedError):
            await net.open_connection(HOST, 7)

    asyncio.run(main())
