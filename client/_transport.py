"""Channel lifecycle, the retrying unary call and the plain server stream, for asyncio and threads.

The two bases are deliberately written side by side: they differ only in ``await`` and the
kind of lock, and share :class:`~modelreg.client._common.RetryPolicy` for every decision. One
channel carries the three services (``ModelService``, ``FleetService``, ``WatchService``); their
stubs are created together, with the channel, and handed to calls as one :class:`SyncStubs` or
:class:`AsyncStubs`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import grpc
from grpc import aio

from modelreg.client._common import DEFAULT_TARGET, ClientConfig, ClientState, Options, RetryPolicy
from modelreg.client.errors import from_rpc_error
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from modelreg.v1 import model_service_pb2_grpc as pb_grpc
from modelreg.v1 import watch_service_pb2_grpc as ws_grpc

if TYPE_CHECKING:
    from modelreg.v1.fleet_service_pb2_grpc import FleetServiceAsyncStub
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub
    from modelreg.v1.watch_service_pb2_grpc import WatchServiceAsyncStub

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


@dataclass(frozen=True)
class SyncStubs:
    """The generated stubs of every service, on one ``grpc`` channel."""

    models: pb_grpc.ModelServiceStub
    fleet: fs_grpc.FleetServiceStub
    watch: ws_grpc.WatchServiceStub

    @classmethod
    def on(cls, channel: grpc.Channel) -> SyncStubs:
        """Create the stubs on ``channel``."""
        return cls(
            pb_grpc.ModelServiceStub(channel),
            fs_grpc.FleetServiceStub(channel),
            ws_grpc.WatchServiceStub(channel),
        )


@dataclass(frozen=True)
class AsyncStubs:
    """The generated stubs of every service, on one ``grpc.aio`` channel."""

    models: ModelServiceAsyncStub
    fleet: FleetServiceAsyncStub
    watch: WatchServiceAsyncStub

    @classmethod
    def on(cls, channel: aio.Channel) -> AsyncStubs:
        """Create the stubs on ``channel``."""
        return cls(
            pb_grpc.ModelServiceStub(channel),
            fs_grpc.FleetServiceStub(channel),
            ws_grpc.WatchServiceStub(channel),
        )


class _Base:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        actor: str | None = None,
        timeout: float = 10.0,
        retries: int | RetryPolicy = 3,
        options: Options | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._config = ClientConfig.create(
            target,
            actor=actor,
            timeout=timeout,
            retries=retries,
            options=options,
            credentials=credentials,
        )
        self._state = ClientState.UNOPENED
        self._init_channel()

    def _init_channel(self) -> None:
        raise NotImplementedError

    @property
    def config(self) -> ClientConfig:
        """Settings of this client."""
        return self._config

    @property
    def state(self) -> ClientState:
        """Lifecycle state: unopened, opened or closed."""
        return self._state

    def _enter(self) -> None:
        if self._state is not ClientState.UNOPENED:
            raise RuntimeError(f"cannot open a client that is {self._state.name.lower()}")
        self._state = ClientState.OPENED

    def _check_open(self) -> None:
        if self._state is ClientState.CLOSED:
            raise RuntimeError("cannot send a request: the client has been closed")


class AsyncTransport(_Base):
    """Base of the asyncio client: a lazily created ``grpc.aio`` channel and retrying calls."""

    _lock: asyncio.Lock
    _channel: aio.Channel | None
    _stubs: AsyncStubs | None

    def _init_channel(self) -> None:
        self._lock = asyncio.Lock()
        self._channel = None
        self._stubs = None

    async def __aenter__(self) -> Self:
        self._enter()
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
            self._check_open()
            if self._stubs is None:
                cfg = self._config
                if cfg.credentials is None:
                    self._channel = aio.insecure_channel(cfg.target, options=cfg.options)
                else:
                    self._channel = aio.secure_channel(cfg.target, cfg.credentials, cfg.options)
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
    ) -> _Resp:
        multi_callable = method(await self._get_stubs())
        cfg = self._config
        deadline = time.monotonic() + cfg.budget(call_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await multi_callable(request, timeout=remaining, metadata=cfg.metadata)
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
    ) -> AsyncIterator[_Resp]:
        """Yield the messages of one server stream: no deadline, no retry, typed errors.

        The call starts on the first iteration and is cancelled when the iteration stops,
        whether the stream ended, failed, or the caller closed the generator.
        """
        call = method(await self._get_stubs())(request, metadata=self._config.metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()


class SyncTransport(_Base):
    """Base of the blocking client: a lazily created ``grpc`` channel and retrying calls."""

    _lock: threading.Lock
    _channel: grpc.Channel | None
    _stubs: SyncStubs | None

    def _init_channel(self) -> None:
        self._lock = threading.Lock()
        self._channel = None
        self._stubs = None

    def __enter__(self) -> Self:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel, cancelling calls in flight. Closing twice is harmless."""
        with self._lock:
            self._state = ClientState.CLOSED
            channel, self._channel, self._stubs = self._channel, None, None
        if channel is not None:
            channel.close()

    def _get_stubs(self) -> SyncStubs:
        # The lock makes concurrent first calls (from several threads) share one channel.
        with self._lock:
            self._check_open()
            if self._stubs is None:
                cfg = self._config
                if cfg.credentials is None:
                    self._channel = grpc.insecure_channel(cfg.target, options=cfg.options)
                else:
                    self._channel = grpc.secure_channel(cfg.target, cfg.credentials, cfg.options)
                self._stubs = SyncStubs.on(self._channel)
                self._state = ClientState.OPENED
            return self._stubs

    def _call(
        self,
        method: Callable[[SyncStubs], grpc.UnaryUnaryMultiCallable[_Req, _Resp]],
        request: _Req,
        call_timeout: float | None,
        *,
        idempotent: bool = True,
    ) -> _Resp:
        multi_callable = method(self._get_stubs())
        cfg = self._config
        deadline = time.monotonic() + cfg.budget(call_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return multi_callable(request, timeout=remaining, metadata=cfg.metadata)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                remaining = deadline - time.monotonic()
                delay = cfg.retry.retry_delay(
                    error.code, attempt=attempt, idempotent=idempotent, remaining=remaining
                )
                if delay is None:
                    raise error from err
            time.sleep(delay)
            attempt += 1

    def _stream(
        self,
        method: Callable[[SyncStubs], grpc.UnaryStreamMultiCallable[_Req, _Resp]],
        request: _Req,
    ) -> Iterator[_Resp]:
        """Yield the messages of one server stream: no deadline, no retry, typed errors.

        The call starts on the first iteration and is cancelled when the iteration stops,
        whether the stream ended, failed, or the caller closed the generator.
        """
        call = method(self._get_stubs())(request, metadata=self._config.metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()
