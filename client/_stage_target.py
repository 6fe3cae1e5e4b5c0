"""What a stage pointer asks of a node following it.

The version to serve and when, and the version a rollout prepares.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws


@dataclass(frozen=True)
class StageTarget:
    """The part of a stage pointer a serving node acts on, as last seen on the stream."""

    version: int = 0
    """The version to serve (0: the stage is empty or gone: keep serving what we have)."""
    activation: float | None = None
    """When to switch to ``version``, on the servers' clock (Unix seconds); ``None``: at once
    (no activation time, or one already past when the server sent the move)."""
    rollout: str = ""
    """The rollout that moved the pointer to ``version``, if one did."""
    pending_version: int = 0
    """The version a rollout prepares (0: none): load it, do not serve it."""
    pending_rollout: str = ""
    """The rollout preparing ``pending_version``."""
    pinned: str = ""
    """The region (``regions/eu``) whose operator pinned ``version`` (break glass), if one
    did: the server's region overrides the primary's pointer until the pin is cleared."""

    @classmethod
    def of(cls, pointer: res.StagePointer, message: ws.WatchStagesResponse) -> StageTarget:
        """What ``pointer``, received in ``message``, asks.

        An activation time at or before the message's own ``server_time`` was past when the
        server sent it: the move applies on receipt, with no clock estimate involved (so an
        emergency rollback, stamped with its commit time, never waits for one).
        """
        activation: float | None = None
        if pointer.HasField("activation_time"):
            at = pointer.activation_time.ToNanoseconds() / 1e9
            sent = message.server_time.ToNanoseconds() / 1e9
            if not message.HasField("server_time") or at > sent:
                activation = at
        pending = pointer.pending_version if pointer.pending_version != pointer.version else 0
        return cls(
            version=pointer.version,
            activation=activation,
            rollout=pointer.rollout,
            pending_version=pending,
            pending_rollout=pointer.pending_rollout if pending else "",
            pinned=pointer.local_pin.region if pointer.HasField("local_pin") else "",
        )

    def rollout_of(self, version: int) -> str:
        """The rollout whose target ``version`` is, if any (what a node report names)."""
        if version and version == self.pending_version:
            return self.pending_rollout
        if version and version == self.version:
            return self.rollout
        return ""
