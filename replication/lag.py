"""How far a region is behind the primary, in revisions and in seconds.

* **revisions**: the newest primary revision the replicator has heard of (watch response
  headers and probes) minus the applied one. On a primary cluster shared with other
  deployments this also counts their revisions.
* **seconds**: etcd does not record when a revision was committed, so the clock starts when the
  replicator *heard* of the oldest revision it has not applied yet; with nothing pending it is
  0 while the primary answers, and otherwise the time since it last answered (since the
  region was last known to be current). A primary that is unreachable therefore shows as a
  growing lag, which is what static stability wants operators to see.

:class:`LagTracker` keeps the figures; :class:`Lag` is what ``Replicator.lag()`` returns (and
what a future RPC sends); :func:`register_metrics` exports any :class:`LagSource` to
Prometheus, read at scrape time, so the replicator itself never imports prometheus_client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass(frozen=True)
class Lag:
    """One replica's view of its region's replication."""

    region: str
    """The region's name."""
    replica: str
    """This replica's id."""
    leader: bool
    """Whether this replica applies (a follower reports the leader's last status record)."""
    applied_revision: int
    """The primary revision the region has applied."""
    primary_revision: int
    """The newest primary revision heard of."""
    revisions: int
    """``primary_revision - applied_revision``, never negative."""
    seconds: float
    """Seconds the region is behind (see the module docstring)."""
    connected: bool
    """Whether the primary answered recently (for a follower: whether the leader's status
    record is current)."""
    commits: int
    """Regional commits this replica made since it started."""
    resyncs: int
    """Generations this replica built from a snapshot (first copy, compaction, oversized
    revision) since it started."""


class LagSource(Protocol):
    """Anything that can tell its lag (the replicator)."""

    def lag(self) -> Lag:
        """The current figures."""
        ...


class LagTracker:
    """The leader's lag, fed by the apply loop; the clock is injectable for tests."""

    def __init__(self, *, live_window: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._window = live_window
        self.applied = 0
        self.head = 0
        self._heard: float | None = None
        self._oldest_pending: float | None = None
        self._started = clock()

    def heard(self, primary_revision: int) -> None:
        """The primary answered, at this revision."""
        self.head = max(self.head, primary_revision)
        self._heard = self._clock()

    def pending(self, oldest: float | None) -> None:
        """When the oldest revision not yet applied was heard of (None: nothing pending)."""
        self._oldest_pending = oldest

    def applied_to(self, revision: int) -> None:
        """The region now holds every change up to ``revision``."""
        self.applied = revision
        self.head = max(self.head, revision)

    def connected(self) -> bool:
        """Whether the primary answered within the live window."""
        return self._heard is not None and self._clock() - self._heard <= self._window

    def seconds(self) -> float:
        """Seconds behind: see the module docstring."""
        now = self._clock()
        if self._oldest_pending is not None:
            return max(0.0, now - self._oldest_pending)
        if self.connected():
            return 0.0
        return now - (self._heard if self._heard is not None else self._started)


def register_metrics(registry: Any, source: LagSource) -> None:
    """Exports ``source.lag()`` to a prometheus_client ``CollectorRegistry`` at scrape time."""
    class _Collector:
        def collect(self) -> Iterator[Any]:
            lag = source.lag()
            labels = ["region"]
            gauges = (
                ("modelreg_replication_lag_revisions",
                 "Primary revisions the region has not applied yet", lag.revisions),
                ("modelreg_replication_lag_seconds",
                 "Seconds the region is behind the primary", lag.seconds),
                ("modelreg_replication_applied_revision",
                 "The primary revision the region has applied", lag.applied_revision),
                ("modelreg_replication_primary_revision",
                 "The newest primary revision heard of", lag.primary_revision),
                ("modelreg_replication_leader",
                 "1 if this replica applies, 0 if it waits", int(lag.leader)),
                ("modelreg_replication_primary_connected",
                 "1 if the primary answered recently", int(lag.connected)),
            )
            for name, doc, value in gauges:
                gauge = GaugeMetricFamily(name, doc, labels=labels)
                gauge.add_metric([lag.region], value)
                yield gauge
            for name, doc, value in (
                ("modelreg_replication_commits", "Regional commits by this replica",
                 lag.commits),
                ("modelreg_replication_resyncs", "Generations built from a primary snapshot",
                 lag.resyncs),
            ):
                counter = CounterMetricFamily(name, doc, labels=labels)
                counter.add_metric([lag.region], value)
                yield counter

    registry.register(_Collector())
