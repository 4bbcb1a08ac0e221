"""Connections in memory: both ends of a link in one process, with no sockets.

`MemoryNetwork` offers the two calls through which the link's ends reach the network,
`start_server` (`OuterLink.start`) and `open_connection` (`InnerLink.connect`,
`MeteredWriter.connect`), with asyncio's signatures. The ends, their parsers, meters and
serving loop (`serve_frames`) run unchanged over it; only the bytes travel through memory
instead of the kernel. A connection is a pair of asyncio streams whose transports feed each
other's readers: a write arrives whole and in order, closing one end is end-of-file for the
other, and writes after a close are dropped, as on a closed TCP connection.

Every connection has the peer name ("memory", port), so the outer's check that the uplink
comes from the downlink's address holds. There is no flow control: tests only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["HOST", "MemoryNetwork"]

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

HOST = "memory"  # the host name of every end


class _Pipe(asyncio.Transport):
    """One end of a connection: what it writes goes into its peer's reader."""

    def __init__(self, protocol: asyncio.StreamReaderProtocol, reader: asyncio.StreamReader,
                 port: int) -> None:  # fmt: skip
        super().__init__({"peername": (HOST, port), "sockname": (HOST, port)})
        self._protocol = protocol
        self._reader = reader
        self.peer: _Pipe | None = None
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.peer is None or self.peer._closing:
            return
        self.peer._reader.feed_data(bytes(data))

    def writelines(self, chunks: object) -> None:
        for chunk in chunks:  # type: ignore[attr-defined]
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:  # no flow control (module doc)
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.peer is not None and not self.peer._closing:
            self.peer._reader.feed_eof()
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


def _end(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _Pipe]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    pipe = _Pipe(protocol, reader, port)
    protocol.connection_made(pipe)
    return reader, asyncio.StreamWriter(pipe, protocol, reader, loop), pipe


class _Socket:
    def __init__(self, port: int) -> None:
        self._port = port

    def getsockname(self) -> tuple[str, int]:
        return HOST, self._port


class _Server:
    """What `start_server` returns: enough of `asyncio.Server` for the link's ends."""

    def __init__(self, port: int, handler: ConnectionHandler) -> None:
        self.sockets = [_Socket(port)]
        self.handler = handler
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


class MemoryNetwork:
    """Servers and connections in memory (module doc)."""

    def __init__(self) -> None:
        self._servers: dict[int, _Server] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    async def start_server(self, handler: ConnectionHandler, host: str, port: int = 0) -> _Server:
        """Listen on `port` (0: the next free one); `host` is only a name here."""
        port = port or max(self._servers, default=0) + 1
        if port in self._servers and not self._servers[port].closed:
            raise OSError(f"address in use: {host}:{port}")
        server = self._servers[port] = _Server(port, handler)
        return server

    async def open_connection(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the server on `port`; its handler runs in a task of its own, as it would
        under asyncio. Raises ConnectionRefusedError (an OSError) when nothing listens."""
        server = self._servers.get(port)
        if server is None or server.closed:
            raise ConnectionRefusedError(f"nothing listens on {host}:{port}")
        reader, writer, pipe = _end(port)
        peer_reader, peer_writer, peer_pipe = _end(port)
        pipe.peer, peer_pipe.peer = peer_pipe, pipe
        task = asyncio.create_task(server.handler(peer_reader, peer_writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return reader, writer
