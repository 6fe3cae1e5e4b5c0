"""The registry: every domain operation over one store, as the servicers see it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from modelreg.server.domain.audit import AuditLog
from modelreg.server.domain.guard import Guard
from modelreg.server.domain.models import Models
from modelreg.server.domain.ports import LocalStore, ModelStore
from modelreg.server.domain.rollouts import Rollouts
from modelreg.server.domain.stages import Stages
from modelreg.server.domain.transaction import DEFAULT_REGION
from modelreg.server.domain.versions import Versions
from modelreg.v1 import resources_pb2 as res


@dataclass(frozen=True)
class Registry:
    """Models, versions, stages, rollouts, their guard and the audit log over one ``ModelStore``."""

    models: Models
    versions: Versions
    stages: Stages
    audit: AuditLog
    rollouts: Rollouts
    guard: Guard
    """The rollout guard's reads and rollback (the coordinator's, while a rollout bakes)."""

    @classmethod
    def over(
        cls,
        store: ModelStore,
        clock: Callable[[], int] = time.time_ns,
        *,
        regions: Sequence[str] = (DEFAULT_REGION,),
        local: LocalStore | None = None,
        local_events: Callable[[], Awaitable[list[res.AuditEvent]]] | None = None,
    ) -> Registry:
        """Builds every operation group over ``store``; ``clock`` returns Unix nanoseconds.

        ``regions`` are the deployment's (the topology's, in order): what rollout policies may
        name, and what a policy naming none waits for. Outside the primary region, ``local``
        is the region's own store (its pins show in stage reads) and ``local_events`` its
        break-glass events not yet in the primary's log (they show in audit listings).
        """
        return cls(Models(store, clock, regions=regions), Versions(store, clock),
                   Stages(store, clock, regions=regions, local=local),
                   AuditLog(store, local_events), Rollouts(store, clock, regions=regions),
                   Guard(store, clock, regions=regions))
