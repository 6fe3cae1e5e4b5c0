"""The latency proxy over real loopback sockets: an echo server or a real grpc.aio server behind.

Timing is checked only as a lower bound of the injected latency (the delay is applied), never
as performance; waits are bounded only so a broken proxy fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelreg.server.latency_proxy import LatencyProxy, split_address


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """A TCP server that sends back what it reads, until EOF; yields its address."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = split_address(address)
    return await asyncio.open_connection(host, port)


async def round_trip(address: str, payload: bytes = b"ping") -> bytes:
    reader, writer = await connect(address)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


async def read_fails(reader: asyncio.StreamReader) -> bool:
    """Whether the connection is broken: a reset, or EOF with nothing before it."""
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except ConnectionError:
        return True


@contextlib.asynccontextmanager
async def health_server() -> AsyncIterator[tuple[str, health.aio.HealthServicer]]:
    """A real grpc.aio server on port 0 with the health service; yields address and servicer."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


class TestForwarding:
    async def test_bytes_arrive_intact_and_in_order_both_ways(self) -> None:
        """Megabytes written in many pieces through a delayed link come back byte for byte."""
        payload = os.urandom(3 * 1024 * 1024 + 17)
        async with echo_server() as target, LatencyProxy(target, latency=0.01) as link:
            reader, writer = await connect(link.address)

            async def send() -> None:
                for start in range(0, len(payload), 10_000):
                    writer.write(payload[start:start + 10_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            received = await asyncio.wait_for(reader.read(-1), 60)  # until the echo's EOF
            await sender
            writer.close()
        assert received == payload

    async def test_many_connections_are_kept_apart(self) -> None:
        """Concurrent connections through one proxy each get back exactly their own bytes."""
        async with echo_server() as target, LatencyProxy(target, latency=0.005) as link:
            payloads = [os.urandom(50_000) + bytes([i]) for i in range(20)]
            got = await asyncio.gather(*(round_trip(link.address, p) for p in payloads))
        assert got == payloads

    async def test_half_close_passes_through(self) -> None:
        """A client's EOF reaches the target, and the target's EOF reaches the client."""
        async with echo_server() as target, LatencyProxy(target) as link:
            reader, writer = await connect(link.address)
            writer.write(b"last words")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 10) == b"last words"
            writer.close()

    async def test_each_direction_is_delayed_by_the_latency(self) -> None:
        """A round trip through a link with 50 ms one-way latency takes at least 100 ms."""
        async with echo_server() as target, LatencyProxy(target, latency=0.05) as link:
            await round_trip(link.address)  # connection set-up is not what is measured
            reader, writer = await connect(link.address)
            started = time.monotonic()
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 10)
            elapsed = time.monotonic() - started
            writer.close()
        assert elapsed >= 0.1 - 0.005

    async def test_latency_can_change_while_running(self) -> None:
        """Setting the latency to zero on a running proxy keeps its connections working."""
        async with echo_server() as target, LatencyProxy(target, latency=0.02) as link:
            assert await round_trip(link.address) == b"ping"
            link.latency = 0
            assert await round_trip(link.address) == b"ping"

    async def test_a_dead_target_resets_the_client(self) -> None:
        """With nothing listening at the target, a client of the proxy sees its connection
        fail instead of hanging.
        """
        async with echo_server() as target:
            pass  # closed: nothing listens there any more
        async with LatencyProxy(target) as link:
            reader, writer = await connect(link.address)
            assert await read_fails(reader)
            writer.close()

    def test_bad_settings_are_refused(self) -> None:
        """A negative latency or an address without a port is a ValueError naming it."""
        with pytest.raises(ValueError, match="latency"):
            LatencyProxy("127.0.0.1:1", latency=-0.01)
        with pytest.raises(ValueError, match="HOST:PORT"):
            LatencyProxy("localhost")


class TestCut:
    async def test_reset_drops_established_and_new_connections_until_healed(self) -> None:
        """A reset cut breaks an open connection and every new one; after heal, new
        connections are forwarded again.
        """
        async with echo_server() as target, LatencyProxy(target) as link:
            reader, writer = await connect(link.address)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            link.cut()
            assert await read_fails(reader)
            writer.close()
            new_reader, new_writer = await connect(link.address)
            assert await read_fails(new_reader)
            new_writer.close()
            link.heal()
            assert await round_trip(link.address) == b"ping"
            assert link.cut_mode is None

    async def test_blackhole_holds_bytes_and_delivers_them_after_heal(self) -> None:
        """In a black hole an open connection stays open but nothing crosses; after heal the
        held bytes arrive, in order, on the same connection.
        """
        async with echo_server() as target, LatencyProxy(target) as link:
            reader, writer = await connect(link.address)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            link.cut("blackhole")
            writer.write(b"during the cut")
            await writer.drain()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.3)
            assert link.connections == 1  # held, not dropped
            link.heal()
            assert await asyncio.wait_for(reader.readexactly(14), 10) == b"during the cut"
            writer.close()

    async def test_blackhole_holds_a_new_connection_until_heal(self) -> None:
        """A connection opened into a black hole is forwarded once the link heals."""
        async with echo_server() as target, LatencyProxy(target) as link:
            link.cut("blackhole")
            reader, writer = await connect(link.address)
            writer.write(b"hello")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.3)
            link.heal()
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            writer.close()

    async def test_bad_cut_mode_is_refused(self) -> None:
        """A cut mode other than reset or blackhole is a ValueError and leaves the link open."""
        async with echo_server() as target, LatencyProxy(target) as link:
            with pytest.raises(ValueError, match="cut mode"):
                link.cut("drop")  # type: ignore[arg-type]
            assert await round_trip(link.address) == b"ping"


class TestGrpcThroughTheProxy:
    async def test_a_cut_breaks_an_open_call_and_heal_restores_new_calls(self) -> None:
        """A server stream through the proxy fails UNAVAILABLE when the link is cut; after
        heal a new call on a new channel succeeds.
        """
        async with health_server() as (target, _), LatencyProxy(target, latency=0.01) as link:
            async with grpc.aio.insecure_channel(link.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                call = stub.Watch(health_pb2.HealthCheckRequest())
                first = await asyncio.wait_for(call.read(), 10)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                link.cut()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call.read(), 10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            link.heal()
            async with grpc.aio.insecure_channel(link.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def test_a_stream_through_a_delayed_link_sees_every_update(self) -> None:
        """Status changes sent on a stream across a 20 ms link arrive in the order sent."""
        async with health_server() as (target, servicer), \
                LatencyProxy(target, latency=0.02) as link, \
                grpc.aio.insecure_channel(link.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="svc"))
            seen = [(await asyncio.wait_for(call.read(), 10)).status]
            serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                    health_pb2.HealthCheckResponse.NOT_SERVING)
            for status in (serving, not_serving, serving):
                await servicer.set("svc", status)
                seen.append((await asyncio.wait_for(call.read(), 10)).status)
            call.cancel()
        assert seen == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
                        serving, not_serving, serving]
