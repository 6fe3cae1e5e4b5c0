"""Simulated serving nodes for ``rollout_latency.py``: N watcher-SDK nodes in one process.

Each node is a real ``AsyncModelWatcher`` (its own WatchStages stream, fleet reports, fetch,
digest check and load of a tiny artifact) on one region's server. Every swap is printed as one
JSON line on stdout: ``{"node", "version", "t" (time.time() at the swap), "source"}``; a line
``{"ready": N}`` once every node serves its first version.

Run by the benchmark: ``python bench/_rollout_nodes.py TARGET REGION COUNT MODEL STAGE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from modelreg.client.watcher import AsyncModelWatcher, Backoff, LoadedModel, SwapCallback


def load(path: Path) -> bytes:
    return path.read_bytes()


async def main(target: str, region: str, count: int, model: str, stage: str) -> None:
    watchers: dict[str, AsyncModelWatcher[bytes]] = {}

    def on_swap(node: str) -> SwapCallback[bytes]:
        def swapped(new: LoadedModel[bytes], old: LoadedModel[bytes] | None) -> None:
            record = watchers[node].stats.last_swap
            source = record.source if record is not None and record.version == new.version \
                else "?"
            print(json.dumps({"node": node, "version": new.version, "t": time.time(),
                              "source": source}), flush=True)
        return swapped

    for i in range(count):
        node = f"{region}-{i}"
        watchers[node] = AsyncModelWatcher(
            model, stage, load, target=target, node_id=node, region=region,
            on_swap=on_swap(node), reconnect_backoff=Backoff(0.05, 1.0),
            retry_backoff=Backoff(0.05, 1.0), ttl_seconds=30)
    for w in watchers.values():
        await w.start()
    for w in watchers.values():
        await w.wait_for_version(timeout=120)
    print(json.dumps({"ready": count}), flush=True)
    try:
        await asyncio.Event().wait()  # until the benchmark terminates this process
    finally:
        for w in watchers.values():
            await w.stop()


if __name__ == "__main__":
    target, region, count, model, stage = sys.argv[1:6]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(target, region, int(count), model, stage))
