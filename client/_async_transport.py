"""Channel lifecycle, the retrying unary call and the plain server stream, for asyncio.

The asyncio source of a blocking twin (edit here, then run
``python -m modelreg.client._unasync``). One channel, from the channel factory, carries the
five services (``ModelService``, ``FleetService``, ``WatchService``, ``RegionService``,
``RolloutService``);
their stubs are created together, with the channel, and handed to calls as one
:class:`AsyncStubs`. Every retry decision is the config's
:class:`~modelreg.client._config.RetryPolicy`; a call's metadata is the config's
(:meth:`~modelreg.client._config.ClientConfig.call_metadata`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar, Unpack

import grpc
from grpc import aio

from modelreg.client._channel import ClientState, async_channel
from modelreg.client._config import ClientConfig, ConnectOptions
from modelreg.client.errors import from_rpc_error
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from modelreg.v1 import model_service_pb2_grpc as pb_grpc
from modelreg.v1 import region_service_pb2_grpc as rs_grpc
from modelreg.v1 import rollout_service_pb2_grpc as ro_grpc
from modelreg.v1 import watch_service_pb2_grpc as ws_grpc

if TYPE_CHECKING:
    from modelreg.v1.fleet_service_pb2_grpc import FleetServiceAsyncStub
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub
    from modelreg.v1.region_service_pb2_grpc import RegionServiceAsyncStub
    from modelreg.v1.rollout_service_pb2_grpc import RolloutServiceAsyncStub
    from modelreg.v1.watch_service_pb2_grpc import WatchServiceAsyncStub

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


@dataclass(frozen=True)
class AsyncStubs:
    """The generated stubs of every service, on one channel."""

    models: ModelServiceAsyncStub
    fleet: FleetServiceAsyncStub
    watch: WatchServiceAsyncStub
    regions: RegionServiceAsyncStub
    rollouts: RolloutServiceAsyncStub

    @classmethod
    def on(cls, channel: aio.Channel) -> AsyncStubs:
        """Create the stubs on ``channel``."""
        return cls(
            pb_grpc.ModelServiceStub(channel),
            fs_grpc.FleetServiceStub(channel),
            ws_grpc.WatchServiceStub(channel),
            rs_grpc.RegionServiceStub(channel),
            ro_grpc.RolloutServiceStub(channel),
        )


class AsyncTransport:
    """Base of the client: a lazily created channel and retrying calls.

    Its constructor takes ``target`` (default ``$MODELREG_TARGET``, else ``127.0.0.1:50051``)
    and passes every other keyword, unnamed, to the config
    (:class:`~modelreg.client._config.ConnectOptions`): a new connection setting is added there.
    """

    def __init__(self, target: str | None = None, **connection: Unpack[ConnectOptions]) -> None:
        self._config = ClientConfig.create(target, **connection)
        self._state = ClientState.UNOPENED
        self._lock = asyncio.Lock()
        self._channel: aio.Channel | None = None
        self._stubs: AsyncStubs | None = None

    @property
    def config(self) -> ClientConfig:
        """Settings of this client."""
        return self._config

    @property
    def state(self) -> ClientState:
        """Lifecycle state: unopened, opened or closed."""
        return self._state

    async def __aenter__(self) -> Self:
        if self._state is not ClientState.UNOPENED:
            raise RuntimeError(f"cannot open a client that is {self._state.name.lower()}")
        self._state = ClientState.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel, cancelling calls in flight. Closing twice is harmless."""
        async with self._lock:
            self._state = ClientState.CLOSED
            channel, self._channel, self._stubs = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def _get_stubs(self) -> AsyncStubs:
        # The lock makes concurrent first calls share one channel.
        async with self._lock:
            if self._state is ClientState.CLOSED:
                raise RuntimeError("cannot send a request: the client has been closed")
            if self._stubs is None:
                self._channel = async_channel(self._config)
                self._stubs = AsyncStubs.on(self._channel)
                self._state = ClientState.OPENED
            return self._stubs

    async def _call(
        self,
        method: Callable[[AsyncStubs], aio.UnaryUnaryMultiCallable[_Req, _Resp]],
        request: _Req,
        call_timeout: float | None,
        *,
        idempotent: bool = True,
        min_revision: int = 0,
    ) -> _Resp:
        metadata = self._config.call_metadata(min_revision)
        multi_callable = method(await self._get_stubs())
        cfg = self._config
        deadline = time.monotonic() + cfg.budget(call_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await multi_callable(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                remaining = deadline - time.monotonic()
                delay = cfg.retry.retry_delay(
                    error.code, attempt=attempt, idempotent=idempotent, remaining=remaining
                )
                if delay is None:
                    raise error from err
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(
        self,
        method: Callable[[AsyncStubs], aio.UnaryStreamMultiCallable[_Req, _Resp]],
        request: _Req,
        *,
        min_revision: int = 0,
    ) -> AsyncIterator[_Resp]:
        """Yield the messages of one server stream: no deadline, no retry, typed errors.

        The call starts on the first iteration and is cancelled when the iteration stops,
        whether the stream ended, failed, or the caller closed the generator.
        """
        metadata = self._config.call_metadata(min_revision)
        call = method(await self._get_stubs())(request, metadata=metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()
