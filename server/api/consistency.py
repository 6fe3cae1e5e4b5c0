"""Read-your-writes across regions: ``x-modelreg-min-revision``, honoured in one place.

A client that wrote through one region and reads through another passes the revision its
write returned as request metadata; the server's interceptor waits, before the handler runs,
until its store has applied that revision (``ModelStore.wait_for``), then lets the call
through. A header rather than a field in every request: it is the same concern for every call
answered from the local store (reads, WatchStages, the fleet view, region status), and one
seam keeps it out of the handlers, as identity is.

The wait ends a little before the caller's deadline (and never lasts more than the server's
``min_revision_wait``), so the caller hears why: UNAVAILABLE with reason
``REVISION_NOT_YET_APPLIED`` and the region's applied revision in the metadata. UNAVAILABLE,
not FAILED_PRECONDITION, by AIP-193 and gRPC's own guidance: the condition is transient and
the same call succeeds when retried once replication catches up (or in another region), with
nothing for the caller to fix first; FAILED_PRECONDITION tells clients not to retry until
something is changed. Nothing is ever answered from a store behind the revision asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from modelreg.server.domain.errors import InvalidArgumentError, RevisionNotYetAppliedError
from modelreg.server.domain.ports import ModelStore

MIN_REVISION_HEADER = "x-modelreg-min-revision"
"""Request metadata: answer only from a store that has applied at least this revision."""

MARGIN = 0.05
"""Seconds (at least; a tenth of what is left when more) kept before the caller's deadline, so
the refusal reaches it before its own DEADLINE_EXCEEDED would."""


def min_revision(metadata: Sequence[tuple[str, str | bytes]]) -> int:
    """The revision the call's metadata asks for; 0 when it asks for none.

    Raises:
        InvalidArgumentError: The value is not a revision (decimal digits).

    """
    for key, value in metadata:
        if key == MIN_REVISION_HEADER:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if not text.isascii() or not text.isdigit() or len(text) > 19:
                raise InvalidArgumentError.field(
                    MIN_REVISION_HEADER, "metadata must be a revision: decimal digits, such "
                    "as the `revision` a mutation returned")
            return int(text)
    return 0


async def wait_for_revision(
    store: ModelStore,
    wanted: int,
    *,
    region: str,
    remaining: float | None,
    max_wait: float,
) -> None:
    """Returns once ``store`` has applied ``wanted``, waiting up to the caller's deadline.

    Args:
        store: The server's store.
        wanted: The call's minimum revision (0: none, return at once).
        region: This server's region, named in the error.
        remaining: Seconds left of the caller's deadline (None: no deadline).
        max_wait: The server's cap on any one wait.

    Raises:
        RevisionNotYetAppliedError: The store had not reached ``wanted`` in time.

    """
    if wanted <= 0:
        return
    budget = max_wait
    if remaining is not None:
        budget = min(budget, remaining - max(MARGIN, remaining / 10))
    applied = await store.wait_for(wanted, timeout=max(0.0, budget))
    if applied < wanted:
        raise RevisionNotYetAppliedError(region, applied, wanted)
