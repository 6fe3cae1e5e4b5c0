"""Serving nodes in the domain tests: node reports through ``Fleet`` over the ``Env``'s store."""

from __future__ import annotations

from modelreg.server.domain.fleet import Fleet
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import MODEL, Env

DIGEST_ERROR = "DigestMismatchError: file:///models/fraud/3.bin: sha256 is not the registered one"


def fleet_of(env: Env) -> Fleet:
    """A fleet over the same store and clock as the registry."""
    return Fleet(env.store, env.clock)


def report(node_id: str, serving: int, *, stage: str = "production", failed: int = 0,
           error: str = "", model_id: str = MODEL) -> fs.ReportNodeRequest:
    """What a watcher reports: one stage, what it serves and what it last failed."""
    served = fs.ServedStage(stage=f"models/{model_id}/stages/{stage}", serving_version=serving,
                            prepared_version=serving, failed_version=failed, error=error)
    return fs.ReportNodeRequest(node=fs.Node(node_id=node_id, stages=[served]), ttl_seconds=15)


async def rollback(env: Env, to_version: int = 0, *, allow_unserved: bool = False,
                   reason: str = "bad p99", stage: str = "production") -> svc.RollbackStageResponse:
    """RollbackStage with the new fields."""
    req = svc.RollbackStageRequest(name=f"models/{MODEL}/stages/{stage}", to_version=to_version,
                                   reason=reason, allow_unserved=allow_unserved)
    return await env.reg.stages.rollback(env.call("RollbackStage", req), req)


async def incident(env: Env, fleet: Fleet) -> None:
    """The incident of issue 14: v1 served, v3 refused by every node, v4 promoted and served."""
    await env.setup(4)
    await env.to_production(1)
    for node in ("node-a", "node-b"):
        await fleet.report(report(node, 1))
    await env.to_production(3)
    for node in ("node-a", "node-b"):
        await fleet.report(report(node, 1, failed=3, error=DIGEST_ERROR))
    await env.to_production(4)
    for node in ("node-a", "node-b"):
        await fleet.report(report(node, 4))


def audit_of(events: list[res.AuditEvent], action: res.AuditAction.ValueType) -> res.AuditEvent:
    """The newest audit event of ``action``."""
    return next(e for e in events if e.action == action)
