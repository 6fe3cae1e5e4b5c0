"""A userspace TCP proxy that delays every byte by a one-way latency and can cut the link.

The inter-region links of a local multi-region cluster (``modelreg up --regions``), the tests of
static stability and the replication benchmarks need a network between regions that is slow
and can fail. These machines have no kernel ``netem``, so the link is a loopback proxy: clients
connect to :attr:`LatencyProxy.address`, and each connection is forwarded to ``target``.

**Delay.** Each direction of a connection is a queue of timestamped chunks: a reader stamps
every chunk it receives with ``now + latency`` and a writer sends each one when its time has
come. Bytes keep their order, and throughput is not capped by the delay (many chunks are in
flight at once, as on a real long link), unlike a sleep per read. A new connection is accepted
at once; its first bytes pay the delay, so a request-response exchange costs a round trip of
twice the latency, as across regions. The latency can change while the proxy runs; chunks
already queued keep their time.

**Cut and heal.** :meth:`LatencyProxy.cut` breaks the link in one of two ways:

* ``"reset"`` (the default): every established connection is reset at once (RST on both sides,
  so both ends see ``ECONNRESET`` right away, as when a router or a host restarts), and each new
  connection is accepted and reset. The listening port stays ours, so no other process can
  take it before :meth:`~LatencyProxy.heal`. gRPC callers fail with ``UNAVAILABLE`` at once.
* ``"blackhole"``: nothing is closed and nothing flows, as in a network partition where packets
  are dropped. Established connections hold their bytes (neither end is told; reads stop, so the
  senders' windows fill) and a new connection is accepted but not forwarded. Callers find out
  only through their own deadlines and keepalives, which is what static-stability tests must
  exercise. On heal, the held connections go on where they stopped, as TCP does after a short
  partition, unless one end gave up in between.

After :meth:`~LatencyProxy.heal` new connections are forwarded again.

Example::

    async with LatencyProxy("127.0.0.1:2379", latency=0.04) as link:
        client = connect(link.address)
        link.cut()
        ...
        link.heal()

Standard library only: the proxy runs in the caller's event loop, so a test, a benchmark or the
launcher holds as many links as it wants without another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal

__all__ = ["CutMode", "LatencyProxy", "split_address"]

CutMode = Literal["reset", "blackhole"]
"""How :meth:`LatencyProxy.cut` breaks the link (see the module docstring)."""

CHUNK = 64 * 1024
"""Bytes read at a time from one side of a connection."""
QUEUED_CHUNKS = 1024
"""Chunks a direction may hold in flight before its reader waits: enough for a link's
bandwidth-delay product at loopback speeds, and a bound on the proxy's memory."""
_RESET_ERRORS = (ConnectionError, OSError)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) as a host and a port.

    Raises:
        ValueError: ``address`` is not ``HOST:PORT``.

    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LatencyProxy:
    """A TCP proxy from a loopback port to ``target`` with a one-way delay; cut and heal.

    Args:
        target: ``HOST:PORT`` every connection is forwarded to.
        latency: One-way delay in seconds added to each direction (0: none).
        listen: ``HOST:PORT`` to listen on; port 0 picks a free one (see :attr:`address`).
        name: A label for ``repr`` and errors, such as ``"eu->us etcd"``.

    Raises:
        ValueError: A negative latency, or an address that is not ``HOST:PORT``.

    """

    def __init__(
        self, target: str, latency: float = 0.0, *, listen: str = "127.0.0.1:0", name: str = ""
    ) -> None:
        self._target = split_address(target)
        self._listen = split_address(listen)
        self.latency = latency
        self.name = name or f"proxy to {target}"
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._mode: CutMode | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        """Connections accepted since the start (cut ones included)."""

    # -- properties -------------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """The one-way delay in seconds; may be changed while the proxy runs."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"latency must be 0 or more seconds, not {seconds!r}")
        self._latency = float(seconds)

    @property
    def target(self) -> str:
        """``HOST:PORT`` connections are forwarded to."""
        return _join(*self._target)

    @property
    def port(self) -> int:
        """The port listened on (chosen at :meth:`start` when ``listen`` said 0)."""
        if self._server is None:
            raise RuntimeError(f"{self.name}: start() first")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        """``HOST:PORT`` to connect to instead of the target."""
        return _join(self._listen[0], self.port)

    @property
    def cut_mode(self) -> CutMode | None:
        """How the link is cut, or None while it forwards."""
        return self._mode

    @property
    def connections(self) -> int:
        """Connections open through the proxy now (held ones of a black hole included)."""
        return len(self._links)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; connections are forwarded from now on."""
        if self._server is not None:
            raise RuntimeError(f"{self.name}: already started")
        host, port = self._listen
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)

    async def close(self) -> None:
        """Stop listening and reset every connection; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.reset()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> LatencyProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def cut(self, mode: CutMode = "reset") -> None:
        """Break the link: ``"reset"`` drops every connection, ``"blackhole"`` holds them.

        Cutting a cut link again switches its mode (a black hole cut with ``"reset"`` drops
        what it held).
        """
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"cut mode must be 'reset' or 'blackhole', not {mode!r}")
        self._mode = mode
        self._flowing.clear()
        if mode == "reset":
            for link in list(self._links):
                link.reset()

    def heal(self) -> None:
        """Forward again: new connections, and the connections a black hole held."""
        self._mode = None
        self._flowing.set()

    def __repr__(self) -> str:
        where = self.address if self._server is not None else "not started"
        state = f"cut ({self._mode})" if self._mode else "open"
        return (f"LatencyProxy({self.name}: {where} -> {self.target}, "
                f"{self._latency * 1000:g} ms, {state})")

    # -- internals --------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: the link runs in a task of ours, which close() and a reset cut
        # cancel (asyncio logs a cancelled connection callback task as an error).
        self.accepted += 1
        link = _Link(self, reader, writer)
        self._links.add(link)
        task = asyncio.create_task(link.run(), name=f"{self.name} link")
        link.task = task
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._links.discard(link)
            self._tasks.discard(task)

        task.add_done_callback(done)

    async def wait_flowing(self) -> None:
        """Returns once the link is not cut (at once while it forwards)."""
        await self._flowing.wait()


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST rather than FIN: the peer's next read or write fails at once."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its connection to the target, pumped both ways."""

    def __init__(
        self, proxy: LatencyProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._client = (reader, writer)
        self._upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.task: asyncio.Task[None] | None = None
        """The task that runs :meth:`run`."""

    def reset(self) -> None:
        """Drop both connections with RST and stop pumping."""
        _reset(self._client[1])
        _reset(self._upstream[1] if self._upstream is not None else None)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def run(self) -> None:
        proxy = self._proxy
        try:
            if proxy.cut_mode == "reset":
                return self.reset()
            # In a black hole the connection is held here: the "SYN" reaches the target only
            # after heal (or never, if the client gives up first).
            await proxy.wait_flowing()
            host, port = split_address(proxy.target)
            try:
                self._upstream = await asyncio.open_connection(host, port)
            except _RESET_ERRORS:
                return self.reset()  # the target is down: the client sees a reset, not a hang
            client_reader, client_writer = self._client
            target_reader, target_writer = self._upstream
            # Each direction ends on its own EOF (half-close passes through); an error on
            # either side resets both, as a broken path would.
            await _both(self._pipe(client_reader, target_writer),
                        self._pipe(target_reader, client_writer))
        except _RESET_ERRORS:
            self.reset()
        finally:
            for writer in (self._client[1], self._upstream[1] if self._upstream else None):
                if writer is not None and not writer.transport.is_closing():
                    writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy ``src`` to ``dst``, each chunk sent ``latency`` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
        proxy = self._proxy

        async def read() -> None:
            while True:
                await proxy.wait_flowing()
                data = await src.read(CHUNK)
                await queue.put((loop.time() + proxy.latency, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await proxy.wait_flowing()
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

        await _both(read(), write())


async def _both(first: Coroutine[Any, Any, None], second: Coroutine[Any, Any, None]) -> None:
    """Run both to their end; the first error cancels the other and is raised."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
