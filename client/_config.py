"""Connection settings of every client-side tool: where the server is, who calls, how to retry.

The clients, the watchers and the CLI all build one :class:`ClientConfig` and hand it to the
channel factory (:mod:`modelreg.client._channel`). A setting added here (a bearer token, client
certificates) reaches every tool through :class:`ChannelOptions`, which the constructors take
as ``**channel`` without listing its keys again: the config and the factory are the only
places such a change touches.

Where the server is, when no ``target`` is given: ``$MODELREG_TARGET``, else
``127.0.0.1:50051``. Read at construction, so one variable points every tool at a server.
"""

from __future__ import annotations

import getpass
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import grpc

TARGET_ENV = "MODELREG_TARGET"
"""Environment variable naming the server (``host:port``) when a tool is given no target."""

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the tools connect when neither a target nor ``$MODELREG_TARGET`` is given."""

ACTOR_ENV = "MODELREG_ACTOR"
"""Environment variable naming the caller for the audit trail when no actor is given."""

ACTOR_METADATA_KEY = "x-modelreg-actor"
"""gRPC metadata key that names the calling actor; the server records it in the audit trail."""

MIN_REVISION_METADATA_KEY = "x-modelreg-min-revision"
"""gRPC metadata key of a read's minimum revision: the server answers once its region has
applied it (read-your-writes across regions)."""

Options = Sequence[tuple[str, Any]]
"""gRPC channel options, as ``grpc.insecure_channel`` takes them."""


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


class ChannelOptions(TypedDict, total=False):
    """How to reach and speak to the server: the keyword arguments every tool takes as-is."""

    actor: str | None
    """Who is calling, for the audit trail; default ``$MODELREG_ACTOR``, else the OS user."""
    credentials: grpc.ChannelCredentials | None
    """TLS channel credentials; plaintext when ``None``."""
    options: Options | None
    """gRPC channel options (keepalive, message sizes...)."""


class ConnectOptions(ChannelOptions, total=False):
    """:class:`ChannelOptions` plus the call settings of the registry clients."""

    timeout: float
    """Default deadline of one call in seconds, retries included; default 10."""
    retries: int | RetryPolicy
    """Retries on UNAVAILABLE (default 3), or a full :class:`RetryPolicy`."""


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings of one client or watcher, fixed at construction.

    Built by :meth:`create` from a tool's arguments; the channel factory reads it.
    """

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
    def create(cls, target: str | None = None, **settings: Unpack[ConnectOptions]) -> ClientConfig:
        """Build a validated config from a tool's arguments, defaults filled in.

        Args:
            target: ``host:port``; ``None`` or empty: ``$MODELREG_TARGET``, else
                ``127.0.0.1:50051``.
            **settings: The keys of :class:`ConnectOptions`: ``actor`` (default
                ``$MODELREG_ACTOR``, else the OS user), ``credentials`` (TLS; plaintext when
                ``None``), ``options`` (gRPC channel options), ``timeout`` (seconds per call,
                retries included; 10), ``retries`` (3, or a :class:`RetryPolicy`).

        Raises:
            TypeError: An unknown setting.
            ValueError: A timeout or retry count out of range.

        """
        unknown = settings.keys() - ConnectOptions.__optional_keys__
        if unknown:
            raise TypeError(f"unexpected keyword argument {', '.join(map(repr, sorted(unknown)))}")
        timeout = settings.get("timeout", 10.0)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        retries = settings.get("retries", 3)
        if isinstance(retries, int):
            if retries < 0:
                raise ValueError(f"retries must be >= 0, not {retries}")
            retries = RetryPolicy(max_retries=retries)
        return cls(
            target=target or default_target(),
            actor=settings.get("actor") or default_actor(),
            timeout=timeout,
            retry=retries,
            options=tuple(settings.get("options") or ()),
            credentials=settings.get("credentials"),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call."""
        return ((ACTOR_METADATA_KEY, self.actor),)

    def call_metadata(self, min_revision: int = 0) -> tuple[tuple[str, str], ...]:
        """Metadata of one call: :attr:`metadata`, and its minimum revision when it has one.

        Raises:
            ValueError: ``min_revision`` is negative.

        """
        if min_revision < 0:
            raise ValueError(f"min_revision must be >= 0, not {min_revision}")
        if not min_revision:
            return self.metadata
        return (*self.metadata, (MIN_REVISION_METADATA_KEY, str(int(min_revision))))

    def budget(self, timeout: float | None) -> float:
        """Return a call's total deadline in seconds: its own ``timeout`` or the default."""
        return self.timeout if timeout is None else timeout


def default_target() -> str:
    """Return ``$MODELREG_TARGET``, else ``127.0.0.1:50051``."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def default_actor() -> str:
    """Return ``$MODELREG_ACTOR``, else the OS user name, else ``"unknown"``."""
    actor = os.environ.get(ACTOR_ENV, "")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
