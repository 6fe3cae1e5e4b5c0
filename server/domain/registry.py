"""The registry: every domain operation over one store, as the servicers see it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from modelreg.server.domain.audit import AuditLog
from modelreg.server.domain.models import Models
from modelreg.server.domain.ports import ModelStore
from modelreg.server.domain.stages import Stages
from modelreg.server.domain.versions import Versions


@dataclass(frozen=True)
class Registry:
    """Models, versions, stages and the audit log over one ``ModelStore``."""

    models: Models
    versions: Versions
    stages: Stages
    audit: AuditLog

    @classmethod
    def over(cls, store: ModelStore, clock: Callable[[], int] = time.time_ns) -> Registry:
        """Builds every operation group over ``store``; ``clock`` returns Unix nanoseconds."""
        return cls(Models(store, clock), Versions(store, clock), Stages(store, clock),
                   AuditLog(store))
