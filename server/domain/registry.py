"""The registry: every domain operation over one store, as the servicers see it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelreg.server.domain.audit import AuditLog
from modelreg.server.domain.guard import Guard
from modelreg.server.domain.models import Models
from modelreg.server.domain.ports import ModelStore
from modelreg.server.domain.rollouts import Rollouts
from modelreg.server.domain.stages import Stages
from modelreg.server.domain.transaction import DEFAULT_REGION
from modelreg.server.domain.versions import Versions


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
    ) -> Registry:
        """Builds every operation group over ``store``; ``clock`` returns Unix nanoseconds.

        ``regions`` are the deployment's (the topology's, in order): what rollout policies may
        name, and what a policy naming none waits for.
        """
        return cls(Models(store, clock, regions=regions), Versions(store, clock),
                   Stages(store, clock, regions=regions), AuditLog(store),
                   Rollouts(store, clock, regions=regions), Guard(store, clock, regions=regions))
