"""The server's clock as a watcher estimates it, to switch at a rollout's activation time.

A rollout's commit sets the stage pointer's ``activation_time`` a margin ahead, on the clock of
the server that committed it; every node in every region must switch when *the servers'*
clock reaches it, whatever its own clock says. Every ``WatchStagesResponse`` carries
``server_time``, the sending server's clock as it wrote the message; the node compares it with
its own (monotonic) clock at receipt.

The assumption, and what it buys:

* The servers' clocks are synchronised (NTP, within a few milliseconds of each other); a
  node's own clock may be off by any amount, and may be stepped while it runs (the estimate
  lives on the monotonic clock, so a step of the node's wall clock changes nothing).
* One sample is ``server_time - local receive time = offset - d``, where ``d >= 0`` is that
  message's one-way delay (network, queues, the event loop). Delay only ever makes the server
  look *older*, so the best estimate is the **largest** sample: ``offset - min(d)``. It is
  never ahead of the server's clock, so a node never switches before the activation time; it
  is late by at most the smallest one-way delay seen (a bookmark on an idle, local link:
  well under a millisecond on a LAN).
* Samples expire (a time window and a count), so a server whose clock was corrected, or a
  reconnection to another server, is followed within ``window`` seconds.

With no sample yet (a server too old to stamp its messages) the offset is 0: the node trusts
its own clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 120.0
"""How long a sample counts; bookmarks (every 10 s by default) keep the window filled."""
MAX_SAMPLES = 64
"""How many samples count at most (a busy stream renews them faster than the window)."""


class ServerClock:
    """Estimates the offset of the server's wall clock from this process's monotonic clock.

    Args:
        window: Seconds a sample counts.
        max_samples: Samples that count at most.
        monotonic: This process's monotonic clock (seconds); what waits are measured on.
        wall: This process's wall clock (Unix seconds); only to report the offset.

    """

    def __init__(
        self,
        *,
        window: float = WINDOW_SECONDS,
        max_samples: int = MAX_SAMPLES,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if window <= 0 or max_samples < 1:
            raise ValueError("window must be positive and max_samples at least 1")
        self._window = window
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._monotonic = monotonic
        self._wall = wall
        self._best: float | None = None  # max(server - monotonic) over the samples

    @property
    def samples(self) -> int:
        """Samples the estimate rests on now."""
        return len(self._samples)

    def observe(self, server_time: float, received: float | None = None) -> None:
        """Take one sample.

        The server said ``server_time`` (Unix seconds) and it arrived at ``received`` on the
        monotonic clock (default: now, so call it on receipt).
        """
        at = self._monotonic() if received is None else received
        self._samples.append((at, server_time - at))
        while self._samples[0][0] < at - self._window:
            self._samples.popleft()  # the sample just taken is never older than the window
        self._best = max(offset for _, offset in self._samples)

    def now(self) -> float:
        """The server's clock now, as estimated (Unix seconds).

        This process's wall clock while there is no sample.
        """
        if self._best is None:
            return self._wall()
        return self._monotonic() + self._best

    def until(self, server_time: float) -> float:
        """Seconds from now until the server's clock reads ``server_time`` (<= 0: past)."""
        return server_time - self.now()

    @property
    def offset(self) -> float:
        """Estimated server clock minus this process's wall clock, in seconds (0: no sample)."""
        if self._best is None:
            return 0.0
        return self._monotonic() + self._best - self._wall()
