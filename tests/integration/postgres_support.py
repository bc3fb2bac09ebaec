"""Where the integration tests find PostgreSQL (127.0.0.1:5432, user postgres with trust auth; README.md, *Tests need Redis and PostgreSQL*), and a
TCP forwarder in front of it that a test can cut (the database goes away: connections reset) or
silence (a partition: sockets stay open, nothing is forwarded, nothing is refused)."""

from __future__ import annotations

import asyncio
import socket
import threading

PG_HOST, PG_PORT = "127.0.0.1", 5432
ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"


def database_url(name: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Forwarder:
    """127.0.0.1:<port> → PostgreSQL, on its own event loop thread (so the test's loop and the
    ledger's worker threads never hold it up).

    ``cut()`` closes the listener and resets every connection; ``restore()`` listens again.
    ``silence()`` is a partition as a proxy or a NAT box makes one: new connections are accepted
    and every socket stays open, but no byte goes through in either direction (the kernel's buffers
    take what the peers send, so their writes succeed and their reads wait forever). ``heal()``
    lets the held bytes through, late, as a healed network would (a held COMMIT then commits).
    """

    def __init__(self, target_port: int = PG_PORT) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = False
        self.silent = False
        self.num_accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._healed = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-forwarder", daemon=True)
        self._thread.start()
        self.restore()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    def restore(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._cut())

    def silence(self) -> None:
        self._run(self._set_silent(True))

    def heal(self) -> None:
        self._run(self._set_silent(False))

    def close(self) -> None:
        if self.silent:
            self.heal()
        if self.up:
            self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _set_silent(self, silent: bool) -> None:
        self.silent = silent
        if silent:
            self._healed.clear()
        else:
            self._healed.set()

    async def _listen(self) -> None:
        if not self.silent:
            self._healed.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.up = True

    async def _cut(self) -> None:
        self.up = False
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._healed.wait()  # accepted, but not connected through while silent
            try:
                up_reader, up_writer = await asyncio.open_connection(PG_HOST, self.target_port)
            except OSError:
                writer.transport.abort()
                return
            if not self.up:  # cut while this connection was being opened
                writer.transport.abort()
                up_writer.transport.abort()
                return
            self.num_accepted += 1
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
        finally:
            self._writers.discard(writer)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._healed.wait()  # hold the bytes while silent (and stop reading more)
                dst.write(data)
                await dst.drain()
            await self._healed.wait()  # a peer's close is held too
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
