"""The etcd key schema, relative to the deployment's prefix (``--prefix``, default ``/modelreg/``).

=====================================================  ==========================================
key                                                    value (protobuf, ``modelreg.v1``)
=====================================================  ==========================================
``models/{model}``                                     ``RegisteredModel`` (holds ``version_count``)
``versions/{model}/{version:012d}``                    ``ModelVersion``
``stages/{model}/{stage}``                             ``StagePointer``
``history/{model}/{stage}/{generation:012d}``          ``PointerHistoryEntry``
``audit/{unix_nanos:020d}-{random:08x}``               ``AuditEvent``
``requests/{sha256(request_id)}``                      ``StoredRequest`` (idempotency, on a lease)
``nodes/{node_id}``                                    ``Node`` (serving node, on its own lease)
``outcomes/{model}/{stage}/{version:012d}/served``     ``StageOutcome`` (a node served it there)
``outcomes/{model}/{stage}/{version:012d}/failed``     ``StageOutcome`` (a node failed it there)
``rollouts/{model}/{stage}/{id:012d}``                 ``Rollout`` (a governed stage's move)
``pins/{model}/{stage}``                               ``StoredPin`` (break glass; region-local)
``localaudit/{unix_nanos:020d}-{random:08x}``          ``StoredLocalEvent`` (region-local audit)
=====================================================  ==========================================

Every per-model key ends its model part with ``/`` so one model's range never covers another
(``versions/fraud/`` versus ``versions/fraud-v2/``). Zero-padded numbers keep key order equal
to numeric order, so range reads come back sorted. ``etag``, ``revision``, ``state`` and
``stages`` are never stored: they are derived from the key's ``mod_revision`` and the pointers.

Outcome records are the durable trace of node reports, which live on leases and vanish: they
make "served in this stage" and "refused in this stage" facts a rollback can rely on
(``modelreg.server.domain.outcomes``). See ``outcome`` for why they are laid out this way.

Rollout records are numbered per stage by the pointer's ``rollout_count`` (the start of a
rollout writes both in one transaction), so the newest is last in key order; deleting a model
deletes its rollouts with one range delete, like its versions and history.

The last two live only in a regional etcd (``modelreg.replication.layout.LOCAL_FAMILIES``):
a region's break-glass pins and their audit events (``modelreg.server.domain.pins``). A local
event keeps its id when the region reports it: it becomes ``audit/{same id}`` on the primary,
so a report is recorded once however often it is sent. Pins are never deleted either (a
cleared pin stays as a record saying so), for the same reason as pointers below.

Stage pointer keys are never deleted: emptying a stage (``ClearStage``) writes a pointer to
version 0, and deleting a model (allowed only while every stage is empty) resets each of its
pointers to a blank one rather than deleting it. Watches rely on it: the highest
``mod_revision`` under ``stages/`` proves which changes a watch still owes
(``modelreg.server.store.etcd_watch``).
"""

from __future__ import annotations

import hashlib


def model(model_id: str) -> str:
    """Key of a registered model."""
    return f"models/{model_id}"


MODELS_START = "models/"
MODELS_END = "models0"  # "0" is the byte after "/": the end of the "models/" range.


def version(model_id: str, number: int) -> str:
    """Key of one model version."""
    return f"versions/{model_id}/{number:012d}"


def versions_prefix(model_id: str) -> str:
    """Prefix of every version of a model."""
    return f"versions/{model_id}/"


def stage(model_id: str, stage_id: str) -> str:
    """Key of a stage pointer."""
    return f"stages/{model_id}/{stage_id}"


STAGES_START = "stages/"
STAGES_END = "stages0"


def stages_prefix(model_id: str) -> str:
    """Prefix of every stage pointer of a model."""
    return f"stages/{model_id}/"


def history(model_id: str, stage_id: str, generation: int) -> str:
    """Key of one move of a stage pointer."""
    return f"history/{model_id}/{stage_id}/{generation:012d}"


def history_prefix(model_id: str, stage_id: str | None = None) -> str:
    """Prefix of the history of one stage, or of every stage of a model."""
    return f"history/{model_id}/" if stage_id is None else f"history/{model_id}/{stage_id}/"


def audit(unix_nanos: int, suffix: int) -> str:
    """Key of an audit event: time-ordered, with a random suffix against same-nanosecond ties."""
    return f"audit/{unix_nanos:020d}-{suffix:08x}"


AUDIT_START = "audit/"
AUDIT_END = "audit0"


def audit_bound(unix_nanos: int) -> str:
    """The first audit key at or after ``unix_nanos``: a bound for time-range reads."""
    return f"audit/{unix_nanos:020d}"


def request(request_id: str) -> str:
    """Key of an idempotency record; hashed so any printable id makes a safe key."""
    return "requests/" + hashlib.sha256(request_id.encode()).hexdigest()


def prefix_end(prefix: str) -> str:
    """The end of the range of keys starting with ``prefix`` (etcd's ``range_end``)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def node(node_id: str) -> str:
    """Key of a serving node's report, on a lease that its reports keep alive."""
    return f"nodes/{node_id}"


NODES_START = "nodes/"
NODES_END = "nodes0"


def outcome(model_id: str, stage_id: str, version_number: int, kind: str) -> str:
    """Key of what the fleet did with one version in one stage (``kind``: served or failed).

    Why this shape:

    * **one key per (stage, version, outcome)**, written create-only by the first report of
      it: node reports scale with the fleet and arrive every few seconds, so a record is never
      rewritten (no read-modify-write, no write per heartbeat) and two servers racing to record
      the same fact simply see the second create fail. Served and failed are separate keys
      because different nodes report them independently;
    * **under the model and stage**, so deleting a model drops its records with one range
      delete, and a rollback reads a stage's records in one range read;
    * **zero-padded version first within the stage**, so the versions a rollback weighs (its
      candidates and the current one) lie in one contiguous range ``outcomes_range`` whose
      read it can guard as a whole.
    """
    return f"outcomes/{model_id}/{stage_id}/{version_number:012d}/{kind}"


def outcomes_prefix(model_id: str) -> str:
    """Prefix of every outcome record of a model."""
    return f"outcomes/{model_id}/"


def outcomes_range(model_id: str, stage_id: str, low: int, high: int) -> tuple[str, str]:
    """The range of a stage's outcome records for versions ``low`` to ``high`` inclusive."""
    return (f"outcomes/{model_id}/{stage_id}/{low:012d}/",
            f"outcomes/{model_id}/{stage_id}/{high + 1:012d}/")


def rollout(model_id: str, stage_id: str, rollout_id: int) -> str:
    """Key of one rollout of a stage."""
    return f"rollouts/{model_id}/{stage_id}/{rollout_id:012d}"


def rollouts_prefix(model_id: str, stage_id: str | None = None) -> str:
    """Prefix of the rollouts of one stage, or of every stage of a model."""
    return f"rollouts/{model_id}/" if stage_id is None else f"rollouts/{model_id}/{stage_id}/"


def pin(model_id: str, stage_id: str) -> str:
    """Key of a region's break-glass pin of a stage (region-local)."""
    return f"pins/{model_id}/{stage_id}"


PINS_START = "pins/"
PINS_END = "pins0"


def local_audit(unix_nanos: int, suffix: int) -> str:
    """Key of a region-local audit event; its id is that of ``audit`` with the same arguments."""
    return f"localaudit/{unix_nanos:020d}-{suffix:08x}"


LOCAL_AUDIT_START = "localaudit/"
LOCAL_AUDIT_END = "localaudit0"
