"""One server process's parts wired together: store, stage hub, fleet and gRPC server.

``modelreg serve``/``up`` and the tests build servers only through ``App``, so what is tested
is what runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from modelreg.server.api.grpc import Metrics, ServerParts, build_server, set_serving
from modelreg.server.domain.fleet import Fleet
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.stage_hub import StageHub
from modelreg.server.store.etcd import EtcdStore
from modelreg.server.store.etcd_watch import EtcdChangeFeed


@dataclass
class App:
    """A running modelreg server over one etcd cluster and key prefix."""

    store: EtcdStore
    hub: StageHub
    parts: ServerParts
    hub_task: asyncio.Task[None]

    @property
    def port(self) -> int:
        """The gRPC port actually bound."""
        return self.parts.port

    @classmethod
    async def start(
        cls,
        endpoints: Sequence[str],
        prefix: str,
        listen: str,
        *,
        etcd_timeout: float = 5.0,
        bookmark_interval: float = 10.0,
        watch_queue: int = 256,
        metrics: Metrics | None = None,
    ) -> App:
        """Connects (lazily) to etcd, starts following stage pointers, and starts serving."""
        store = EtcdStore(endpoints, prefix, timeout=etcd_timeout)
        # Progress requests keep the hub's revision (and so bookmarks) current and detect a
        # silent watch; twice per bookmark interval, at most once a second.
        progress = min(1.0, bookmark_interval / 2, etcd_timeout)
        hub = StageHub(store, EtcdChangeFeed(store, progress_interval=progress),
                       queue_size=watch_queue)
        parts = build_server(Registry.over(store), listen, hub=hub, fleet=Fleet(store),
                             bookmark_interval=bookmark_interval, metrics=metrics)
        hub_task = asyncio.create_task(hub.run(), name="stage-hub")
        await parts.server.start()
        return cls(store, hub, parts, hub_task)

    async def set_serving(self, serving: bool) -> None:
        """Sets the health status of the server and its services."""
        await set_serving(self.parts, serving)

    async def stop(self, grace: float = 0.0) -> None:
        """Stops serving (in-flight RPCs get ``grace`` seconds), the hub, and the connection."""
        await self.set_serving(False)
        await self.parts.server.stop(grace)
        self.hub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.hub_task
        await self.store.close()
