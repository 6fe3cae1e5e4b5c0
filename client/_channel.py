"""The one channel factory of the client package, and the lifecycle of what owns a channel.

Every connection the clients, the watchers and the CLI open comes from :func:`async_channel`
or :func:`sync_channel`, built from a :class:`~modelreg.client._config.ClientConfig`: address,
TLS credentials and channel options (keepalive among them) are decided here and nowhere else,
so authentication (call credentials, client certificates) is added in this module and the
config, not in each tool.
"""

from __future__ import annotations

import enum

import grpc
from grpc import aio

from modelreg.client._config import ClientConfig


class ClientState(enum.Enum):
    """Lifecycle of a client (as in httpx): it opens once and, once closed, stays closed."""

    UNOPENED = 1
    """Created; no channel yet."""
    OPENED = 2
    """Inside ``with``, or a call has created the channel."""
    CLOSED = 3
    """Closed; every further call raises ``RuntimeError``."""


def async_channel(config: ClientConfig) -> aio.Channel:
    """Open a ``grpc.aio`` channel to ``config.target``: TLS with credentials, else plaintext."""
    if config.credentials is None:
        return aio.insecure_channel(config.target, options=config.options)
    return aio.secure_channel(config.target, config.credentials, config.options)


def sync_channel(config: ClientConfig) -> grpc.Channel:
    """Open a blocking ``grpc`` channel, exactly as :func:`async_channel` opens an asyncio one."""
    if config.credentials is None:
        return grpc.insecure_channel(config.target, options=config.options)
    return grpc.secure_channel(config.target, config.credentials, config.options)
