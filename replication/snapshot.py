"""A consistent copy of the primary's replicated keys, read page by page at one revision.

Every page is a Range at the same ``revision``, so the pages together are one cut of the
primary however long the copy takes, unless the primary compacts that revision meanwhile
(:class:`~modelreg.replication.errors.Compacted`; the caller starts over at a newer one).
Region-local families are skipped by reading only :func:`~modelreg.replication.layout.
replicated_ranges`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aetcd import rpc

from modelreg.replication.etcd import Etcd
from modelreg.replication.layout import Envelope, replicated_ranges

PAGE = 100
"""Keys per Range: a version record may be 512 KiB, and a page must fit a gRPC message."""


class PrimarySnapshot:
    """The replicated keys of ``prefix`` at one primary revision."""

    def __init__(self, etcd: Etcd, prefix: bytes, revision: int, *, page: int = PAGE) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self.revision = revision
        self._page = page
        self.keys = 0
        """Keys read so far."""

    @classmethod
    async def at(cls, etcd: Etcd, prefix: bytes, revision: int | None = None) -> PrimarySnapshot:
        """A snapshot at ``revision``, or at the primary's current revision."""
        return cls(etcd, prefix, revision if revision is not None else await etcd.revision())

    async def pages(self) -> AsyncIterator[list[tuple[bytes, Envelope]]]:
        """``(key relative to the prefix, envelope)`` pairs in key order, a page at a time."""
        skip = len(self._prefix)
        for start, end in replicated_ranges(self._prefix):
            key = start
            while True:
                resp = await self._etcd.range(rpc.RangeRequest(
                    key=key, range_end=end, revision=self.revision, limit=self._page))
                page = [(bytes(kv.key[skip:]),
                         Envelope(bytes(kv.value), kv.mod_revision, kv.create_revision,
                                  kv.version))
                        for kv in resp.kvs]
                if page:
                    self.keys += len(page)
                    yield page
                if not resp.more or not resp.kvs:
                    break
                key = bytes(resp.kvs[-1].key) + b"\0"
