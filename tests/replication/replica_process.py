"""A replicator as a real child process (``python -m modelreg.replication``), for crash tests.

Its JSON log lines (stderr) are collected so a test can wait for an event; :meth:`Replica.end`
SIGKILLs it if it still runs, so a failing test never leaks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Any


class Replica:
    """One replicator child process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, argv: list[str]) -> Replica:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The log records of one event, so far."""
        return [e for e in self.events if e.get("event") == event]

    async def wait_logged(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first record of ``event``; fails the test if the process exits or ``timeout``
        passes first (a bound, not a measurement).
        """
        deadline = time.monotonic() + timeout
        while not self.logged(event):
            assert self.proc.returncode is None, (
                f"replicator exited {self.proc.returncode} before {event}:\n"
                + "\n".join(self.lines[-20:]))
            assert time.monotonic() < deadline, (
                f"no {event} from the replicator:\n" + "\n".join(self.lines[-20:]))
            await asyncio.sleep(0.02)
        return self.logged(event)[0]

    async def kill(self) -> None:
        """SIGKILL, as a crash would, and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then its exit code (SIGKILL if it takes longer than ``timeout``)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise

    async def end(self) -> None:
        """Makes sure the process is gone and its log read."""
        await self.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._reader, 5)
