"""Keeps the embedded etcd of ``modelreg up`` running: restart with backoff when it exits.

Without supervision one etcd crash (etcd 3.5.0-3.5.4 panics on a cancelled read-only Txn,
etcd issue 14110; or the OOM killer; or a stray ``kill``) left the registry UNAVAILABLE until a
person restarted it. The supervisor notices the child's exit within :attr:`POLL` seconds, logs
it with its exit status and log tail, reports the store down (so health says NOT_SERVING), and
starts etcd again on the same ports and data dir: a single member recovers from its own WAL,
so nothing committed is lost. Restarts back off exponentially up to ``max_backoff`` so a crash
loop does not spin; a run that lasted ``stable_after`` seconds resets the backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.etcd_health import EtcdStartError

__all__ = ["EtcdSupervisor"]

log = structlog.get_logger("modelreg.server.etcd")


class EtcdSupervisor:
    """Restarts an :class:`EmbeddedEtcd` whenever it exits, until the task running it ends.

    Args:
        etcd: A started etcd.
        on_change: Awaited with False when etcd is found dead and True once it is back.
        on_restart: Called after each successful restart (e.g. a Prometheus counter's ``inc``).
        initial_backoff: Seconds before the first restart attempt after an exit.
        max_backoff: Ceiling of the doubling delay between attempts.
        stable_after: Seconds of uptime after which the next exit starts from
            ``initial_backoff`` again.
        start_timeout: Seconds one restart may take to become healthy.

    """

    POLL = 0.2
    """Seconds between checks of the child; a wait on the child would need a thread."""

    def __init__(
        self,
        etcd: EmbeddedEtcd,
        *,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
        on_restart: Callable[[], object] | None = None,
        initial_backoff: float = 0.1,
        max_backoff: float = 10.0,
        stable_after: float = 30.0,
        start_timeout: float = 30.0,
    ) -> None:
        self._etcd = etcd
        self._on_change = on_change
        self._on_restart = on_restart
        self._initial = initial_backoff
        self._max = max_backoff
        self._stable_after = stable_after
        self._start_timeout = start_timeout
        self.restarts = 0
        """Successful restarts so far."""

    @property
    def up(self) -> bool:
        """Whether the etcd child is running right now."""
        return self._etcd.running

    async def run(self) -> None:
        """Watches and restarts etcd forever; cancel the task to stop (before stopping etcd)."""
        delay = self._initial
        started = time.monotonic()
        while True:
            # Polled: the child is a plain Popen (started on the main thread for its parent-death
            # signal), and waiting on it would hold a thread for the life of the server.
            while self._etcd.running:  # noqa: ASYNC110
                await asyncio.sleep(self.POLL)
            pid, code = self._etcd.reap() or (None, None)
            if time.monotonic() - started >= self._stable_after:
                delay = self._initial
            log.error("etcd_exited", pid=pid, exit_code=code, log_tail=self._etcd.log_tail(),
                      restart_in=delay)
            if self._on_change is not None:
                await self._on_change(False)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max)
                try:
                    await self._etcd.start_async(self._start_timeout)
                    break
                except (EtcdStartError, OSError) as err:
                    log.error("etcd_restart_failed", error=str(err), retry_in=delay)
            started = time.monotonic()
            self.restarts += 1
            if self._on_restart is not None:
                self._on_restart()
            log.warning("etcd_restarted", pid=self._etcd.pid, endpoint=self._etcd.endpoint,
                        restarts=self.restarts)
            if self._on_change is not None:
                await self._on_change(True)
