"""What the fleet did with each version in each stage, kept after the nodes are gone.

Node reports live on leases and vanish with their node, yet a rollback must know, long after,
whether a version ever served in a stage. So the first report of each fact is recorded durably
(``keys.outcome``), once per stage, version and outcome:

* **served** in a stage: at least one node reported ``serving_version`` = that version for
  that stage;
* **failed** in a stage: at least one node reported ``failed_version`` = that version for that
  stage (a digest mismatch, fetch or loader error);
* **refused** in a stage: failed there and never served there. A version that some node did
  serve counts as served, whatever other nodes reported: it is known to load and run.

A record is written only while the version exists (the write is guarded on the version's key),
and deleted with its model. Reports repeat every few seconds per node, so a server remembers
for ``MEMO_SECONDS`` which records it has seen (``Memo``): a heartbeat that brings nothing new
costs no etcd request at all, and a new fact costs one read and one create-only write.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from modelreg.server.domain import keys, names
from modelreg.server.domain.errors import InvalidArgumentError, clip
from modelreg.server.domain.ports import Entry
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import store_pb2

SERVED, FAILED = "served", "failed"
MEMO_SECONDS = 60.0
"""How long a server trusts that a record it saw still exists before it reads it again."""
MEMO_SIZE = 100_000
MAX_DETAIL = 200
"""Characters of a node's error quoted in a skipped candidate's detail."""


@dataclass(frozen=True)
class Wanted:
    """An outcome record a report asks for, and the version key whose existence guards it."""

    key: str
    version_key: str
    value: bytes


def wanted(node: fs.Node, now: timestamp_pb2.Timestamp) -> list[Wanted]:
    """The records a (validated) report would create if they do not exist yet."""
    found: dict[str, Wanted] = {}
    for served in node.stages:
        try:
            model_id, stage = names.parse_stage("stage", served.stage)
        except InvalidArgumentError:  # validated before; never record a name we cannot parse
            continue
        facts = [(SERVED, served.serving_version, ""), (FAILED, served.failed_version,
                                                         served.error)]
        for kind, number, error in facts:
            if number <= 0:
                continue
            record = store_pb2.StageOutcome(
                node_id=node.node_id, region=node.region, error=error, time=now)
            key = keys.outcome(model_id, stage, number, kind)
            found.setdefault(key, Wanted(key, keys.version(model_id, number),
                                         record.SerializeToString(deterministic=True)))
    return list(found.values())


class Memo:
    """Record keys known to exist, each trusted for ``seconds``; bounded (least recent out)."""

    def __init__(self, seconds: float = MEMO_SECONDS, size: int = MEMO_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._size = size
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def known(self, key: str) -> bool:
        """Whether ``key`` was seen to exist less than ``seconds`` ago."""
        seen = self._seen.get(key)
        return seen is not None and self._clock() - seen < self._seconds

    def add(self, keys_seen: Iterable[str]) -> None:
        """Remembers that these keys exist, as of now."""
        now = self._clock()
        for key in keys_seen:
            self._seen[key] = now
            self._seen.move_to_end(key)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)


@dataclass(frozen=True)
class FleetRecord:
    """The recorded outcomes of some versions in one stage (see the module docstring)."""

    served: frozenset[int] = frozenset()
    failed: Mapping[int, str] = field(default_factory=dict)
    """Version -> the first failure recorded, as ``node-a: DigestMismatchError: ...``."""

    @classmethod
    def from_entries(cls, entries: Sequence[Entry]) -> FleetRecord:
        """Builds the record from the entries of a range of ``keys.outcome`` keys."""
        served: set[int] = set()
        failed: dict[int, str] = {}
        for entry in entries:
            number, kind = entry.key.rsplit("/", 2)[-2:]
            version = int(number)
            if kind == SERVED:
                served.add(version)
            elif kind == FAILED:
                outcome = store_pb2.StageOutcome.FromString(entry.value)
                failed[version] = f"{outcome.node_id}: {clip(outcome.error, MAX_DETAIL)}" if (
                    outcome.error) else outcome.node_id
        return cls(frozenset(served), failed)

    @property
    def evidence(self) -> bool:
        """Whether any node reported on any of these versions in this stage."""
        return bool(self.served or self.failed)

    def skip(self, version: int, stage: str) -> res.SkippedCandidate | None:
        """Why ``version`` is no known-good target in ``stage``, or None if it served there.

        Without any evidence (no node reports on this stage) nothing is skipped for the fleet.
        """
        if not self.evidence or version in self.served:
            return None
        if version in self.failed:
            return res.SkippedCandidate(
                version=version, reason=res.SKIP_REASON_REFUSED,
                detail=f"refused by the fleet and never served in {stage} "
                       f"(first failure: {self.failed[version]})")
        return res.SkippedCandidate(
            version=version, reason=res.SKIP_REASON_NEVER_SERVED,
            detail=f"no node ever reported serving it in {stage}")
