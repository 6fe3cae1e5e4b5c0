"""What a watcher counts and records: ``watcher.stats`` and the swaps it made."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class SwapRecord:
    """One replacement of ``watcher.current``: what, when, and why then."""

    version: int
    """The version swapped in."""
    from_version: int
    """The version it replaced (0: none)."""
    local_time: datetime
    """This node's wall clock (UTC) when ``current`` was replaced."""
    server_time: datetime
    """The same instant on the servers' clock, as the node estimates it (``clock_offset``)."""
    activation_time: datetime | None
    """The pointer's activation time (servers' clock), if the move had one still ahead when
    it arrived; ``None``: switched on receipt."""
    rollout: str
    """The rollout that moved the pointer there, if one did."""
    source: str
    """Where the model came from: ``prepared`` (loaded ahead, while a rollout prepared it),
    ``previous`` (the warm previous model: no fetch, no load) or ``loaded`` (fetched and loaded
    after the pointer named it)."""


@dataclass(frozen=True)
class WatcherStats:
    """A snapshot of a watcher's counters (``watcher.stats``)."""

    committed_version: int
    """The version the stage pointer names, as last seen on the stream (0: empty or unknown)."""
    last_revision: int
    """etcd revision the watcher is up to (changes and bookmarks move it)."""
    swaps: int
    """Times ``current`` was replaced (rollbacks to the warm previous model included)."""
    failures: int
    """Failed attempts to prepare a version (metadata, fetch, digest, loader)."""
    reconnects: int
    """Times the watch stream was opened again after it failed or ended."""
    reports: int
    """Successful ``ReportNode`` calls."""
    report_failures: int
    """Failed ``ReportNode`` calls."""
    failed_version: int
    """Last version that failed to prepare, 0 once a later swap succeeded."""
    last_error: str
    """Why ``failed_version`` failed."""
    pending_version: int = 0
    """The version a rollout is preparing on the stage (0: none)."""
    pending_rollout: str = ""
    """The rollout preparing it."""
    prepared_version: int = 0
    """The version loaded and ready but not serving (a rollout's target; 0: none)."""
    clock_offset: float = 0.0
    """Estimated servers' clock minus this node's wall clock, in seconds (see
    :mod:`modelreg.client._server_clock`); 0 until a message carried the server's time."""
    last_swap: SwapRecord | None = None
    """The latest swap."""
    recent_swaps: tuple[SwapRecord, ...] = ()
    """The latest swaps, oldest first (at most :data:`RECENT_SWAPS`)."""


RECENT_SWAPS = 32
"""Swaps ``watcher.stats.recent_swaps`` keeps."""


@dataclass
class Counters:
    """The mutable counters behind :class:`WatcherStats`."""

    committed_version: int = 0
    last_revision: int = 0
    swaps: int = 0
    failures: int = 0
    reconnects: int = 0
    reports: int = 0
    report_failures: int = 0
    failed_version: int = 0
    last_error: str = ""
    swap_time: datetime | None = None
    pending_version: int = 0
    pending_rollout: str = ""
    prepared_version: int = 0
    recent_swaps: deque[SwapRecord] = field(default_factory=lambda: deque(maxlen=RECENT_SWAPS))

    def drop_failure_unless(self, *versions: int) -> bool:
        """Forget the failure unless it is of one of ``versions``; tell whether one was forgotten.

        A failure applies while the pointer names the version that failed (as its version, or
        as the version a rollout prepares): once it moves on (a rollback, an abort, say) the
        report must stop carrying it, even if no swap follows.
        """
        if not self.failed_version or self.failed_version in versions:
            return False
        self.failed_version, self.last_error = 0, ""
        return True

    def snapshot(self, clock_offset: float = 0.0) -> WatcherStats:
        """Freeze the counters."""
        return WatcherStats(
            committed_version=self.committed_version,
            last_revision=self.last_revision,
            swaps=self.swaps,
            failures=self.failures,
            reconnects=self.reconnects,
            reports=self.reports,
            report_failures=self.report_failures,
            failed_version=self.failed_version,
            last_error=self.last_error,
            pending_version=self.pending_version,
            pending_rollout=self.pending_rollout,
            prepared_version=self.prepared_version,
            clock_offset=clock_offset,
            last_swap=self.recent_swaps[-1] if self.recent_swaps else None,
            recent_swaps=tuple(self.recent_swaps),
        )
