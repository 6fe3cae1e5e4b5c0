"""Plumbing the sync and asyncio clients share: settings, lifecycle state, retries, paging."""

from __future__ import annotations

import enum
import getpass
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

ACTOR_METADATA_KEY = "x-modelreg-actor"
"""gRPC metadata key that names the calling actor; the server records it in the audit trail."""

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the clients connect when no target is given."""

Options = Sequence[tuple[str, Any]]
"""gRPC channel options, as ``grpc.insecure_channel`` takes them."""


class ClientState(enum.Enum):
    """Lifecycle of a client (as in httpx): it opens once and, once closed, stays closed."""

    UNOPENED = 1
    """Created; no channel yet."""
    OPENED = 2
    """Inside ``with``, or a call has created the channel."""
    CLOSED = 3
    """Closed; every further call raises ``RuntimeError``."""


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a call is retried: only on UNAVAILABLE, only if idempotent.

    Reads are idempotent; mutations are when they carry a ``request_id`` (the clients generate
    one unless told otherwise), because the server applies a repeated id once. The delay before
    retry ``n`` (0-based) is drawn uniformly from ``[0, min(max_backoff, initial * mult**n)]``
    ("full jitter"), and no attempt starts after the call's deadline.
    """

    max_retries: int = 3
    """Retries after the first attempt; 0 disables retrying."""
    initial_backoff: float = 0.1
    """Upper bound of the first delay, in seconds."""
    max_backoff: float = 2.0
    """Cap of every delay, in seconds."""
    multiplier: float = 2.0
    """Growth of the delay bound per retry."""
    retryable_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    """Codes worth another attempt; only failures that certainly did not apply belong here."""

    def should_retry(self, code: grpc.StatusCode, *, attempt: int, idempotent: bool) -> bool:
        """Tell whether a call that failed with ``code`` on 0-based ``attempt`` may go again."""
        return idempotent and attempt < self.max_retries and code in self.retryable_codes

    def backoff(self, attempt: int) -> float:
        """Draw the seconds to wait before retrying after 0-based ``attempt`` failed."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return random.uniform(0.0, bound)  # jitter, not cryptography

    def retry_delay(
        self, code: grpc.StatusCode, *, attempt: int, idempotent: bool, remaining: float
    ) -> float | None:
        """Return the seconds to sleep before the next attempt, or ``None`` to give up.

        Args:
            code: Status code of the failed attempt.
            attempt: 0-based number of the failed attempt.
            idempotent: Whether repeating the call is safe.
            remaining: Seconds left until the call's deadline.

        """
        if not self.should_retry(code, attempt=attempt, idempotent=idempotent):
            return None
        delay = self.backoff(attempt)
        return delay if delay < remaining else None


@dataclass(frozen=True)
class ClientConfig:
    """Settings shared by both clients, fixed at construction."""

    target: str
    """``host:port`` of the modelreg server."""
    actor: str
    """Sent as ``x-modelreg-actor`` with every call."""
    timeout: float
    """Default deadline of one call, retries included, in seconds."""
    retry: RetryPolicy
    """When failed calls are retried."""
    options: Options
    """gRPC channel options."""
    credentials: grpc.ChannelCredentials | None
    """TLS credentials; ``None`` for a plaintext channel."""

    @classmethod
    def create(
        cls,
        target: str,
        *,
        actor: str | None,
        timeout: float,
        retries: int | RetryPolicy,
        options: Options | None,
        credentials: grpc.ChannelCredentials | None,
    ) -> ClientConfig:
        """Build a validated config from the clients' constructor arguments."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        if isinstance(retries, int):
            if retries < 0:
                raise ValueError(f"retries must be >= 0, not {retries}")
            retries = RetryPolicy(max_retries=retries)
        return cls(
            target=target,
            actor=actor or default_actor(),
            timeout=timeout,
            retry=retries,
            options=tuple(options or ()),
            credentials=credentials,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call."""
        return ((ACTOR_METADATA_KEY, self.actor),)

    def budget(self, timeout: float | None) -> float:
        """Return a call's total deadline in seconds: its own ``timeout`` or the default."""
        return self.timeout if timeout is None else timeout


def default_actor() -> str:
    """Return ``$MODELREG_ACTOR``, else the OS user name, else ``"unknown"``."""
    actor = os.environ.get("MODELREG_ACTOR", "")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def new_request_id(request_id: str | None) -> str:
    """Return the caller's idempotency key, or a fresh uuid4 for ``None`` (``""`` stays)."""
    return str(uuid.uuid4()) if request_id is None else request_id


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


_P = TypeVar("_P", bound=_Page)
_T = TypeVar("_T")


def pages(fetch: Callable[[str], _P], items: Callable[[_P], Iterable[_T]]) -> Iterator[_T]:
    """Yield the items of every page, calling ``fetch(page_token)`` until the token is empty."""
    token = ""
    while True:
        page = fetch(token)
        yield from items(page)
        token = page.next_page_token
        if not token:
            return


async def apages(
    fetch: Callable[[str], Awaitable[_P]], items: Callable[[_P], Iterable[_T]]
) -> AsyncIterator[_T]:
    """Yield the items of every page, awaiting ``fetch(page_token)`` until the token is empty."""
    token = ""
    while True:
        page = await fetch(token)
        for item in items(page):
            yield item
        token = page.next_page_token
        if not token:
            return
