"""Watch streams in their own process, for the chaos test: each stream resumes after any
disconnect from its last revision + 1 and records every message it received.

Usage: python tests/watch_chaos_client.py TARGET STREAMS OUT_JSON
Stream ``i`` selects ``SELECTIONS[i % 3]``. A line ``REVISION`` on stdin says the test is
done: once every stream has reached that revision, the record goes to OUT_JSON as
``[{"selection": ..., "messages": [[type, revision, reset, [[name, version], ...], resumes],
...],
"resumes": N, "error": ...}, ...]`` and the process exits.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
from pathlib import Path
from typing import Any

import grpc

from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc

SELECTIONS: list[dict[str, Any]] = [
    {"models": ["chaos-a"]},
    {"models": ["chaos-b"], "stages": ["canary"]},
    {"model_prefix": "chaos-"},
]


class Stream:
    """One resuming stream and what it received."""

    def __init__(self, target: str, selection: dict[str, Any]) -> None:
        self.target = target
        self.selection = selection
        self.messages: list[list[Any]] = []
        self.last = 0
        self.resumes = 0
        self.error = ""

    async def run(self, channel: grpc.aio.Channel) -> None:
        stub = watch_service_pb2_grpc.WatchServiceStub(channel)
        while True:
            request = ws.WatchStagesRequest(
                start_revision=self.last + 1 if self.last else 0, **self.selection)
            try:
                async for m in stub.WatchStages(request):
                    items = [[p.name, p.version] for p in m.snapshot] + [
                        [c.stage.name, c.stage.version] for c in m.changes]
                    self.messages.append([m.type, m.revision, m.reset, items, self.resumes])
                    self.last = m.revision
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    self.error = f"{err.code().name}: {err.details()}"
                    return
            self.resumes += 1
            await asyncio.sleep(random.uniform(0.01, 0.05))


async def main(target: str, count: int) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def read_stdin() -> None:
        line = sys.stdin.readline()
        loop.call_soon_threadsafe(done.set_result, int(line))

    threading.Thread(target=read_stdin, daemon=True).start()
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    streams = [Stream(target, SELECTIONS[i % len(SELECTIONS)]) for i in range(count)]
    tasks = [asyncio.create_task(s.run(channels[i % len(channels)]))
             for i, s in enumerate(streams)]
    final = await done
    async with asyncio.timeout(60):
        while any(s.last < final and not s.error for s in streams):
            await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    return [{"selection": s.selection, "messages": s.messages, "resumes": s.resumes,
             "error": s.error} for s in streams]


if __name__ == "__main__":
    record = asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    Path(sys.argv[3]).write_text(json.dumps(record))
