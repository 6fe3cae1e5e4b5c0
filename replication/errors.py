"""The replicator's errors: one root, each saying what the agent does about it.

::

    ReplicationError
    ├── EtcdUnavailable     an etcd (primary or regional) did not answer: retry, back off
    ├── Compacted           the primary no longer has a revision the replicator needs: resync
    ├── LostRace            a guarded regional commit failed: re-read the state and go on
    │   └── NotLeader       ... because this replica no longer holds the leader key: step down
    └── TooLarge            one key-value exceeds what the regional etcd accepts: fatal
"""

from __future__ import annotations


class ReplicationError(Exception):
    """Root of the replicator's errors."""


class EtcdUnavailable(ReplicationError):
    """An etcd call failed as unavailable (or timed out); the caller retries later."""


class Compacted(ReplicationError):
    """The primary compacted a revision the replicator still needs."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"the primary compacted its history up to revision {revision}")
        self.revision = revision


class LostRace(ReplicationError):
    """A regional commit's guard failed: the state is not what this replica last read."""


class NotLeader(LostRace):
    """The leader key no longer names this replica."""


class TooLarge(ReplicationError):
    """A single key-value does not fit in one regional request."""
