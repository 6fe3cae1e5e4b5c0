"""Which etcd releases have known bugs that touch modelreg, so a server can say so at start.

The table is the short form of ``deploy/ETCD_VERSIONS.md`` (researched 2026-12-02). modelreg
works around the watch-ordering bugs (etcd 15220, 17507) and the read-only Txn panic (14110)
itself; what is listed here it cannot work around: data the etcd release itself may lose or
serve stale. A server logs them in one warning at startup, so an operator learns it before
the data is at stake.
"""

from __future__ import annotations

import re

Version = tuple[int, int, int]

KNOWN_BUGS: tuple[tuple[Version, Version, str], ...] = (
    ((3, 5, 0), (3, 5, 3), "can lose committed writes after a crash under load (etcd #13766)"),
    ((3, 4, 0), (3, 4, 21), "a single member can lose an acknowledged write on a crash (#14370)"),
    ((3, 5, 0), (3, 5, 5), "a single member can lose an acknowledged write on a crash (#14370)"),
    ((3, 4, 0), (3, 5, 0), "3.4 is end of life and lacks the watch, compaction and lease fixes "
                           "of 3.4.31-3.4.42"),
    ((3, 5, 0), (3, 5, 28), "lacks the fixes for stale reads (#20418) and for watch, compaction "
                            "and lease bugs (3.5.13-3.5.28)"),
)
ADVICE = "run etcd 3.6.9 or later (or 3.5.28+); see deploy/ETCD_VERSIONS.md"


def parse(text: str) -> Version | None:
    """``(3, 5, 1)`` for ``"3.5.1"`` (suffixes ignored); ``None`` if it is no such version."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def known_bugs(text: str) -> list[str]:
    """The known bugs of the etcd release ``text`` that modelreg cannot work around."""
    version = parse(text)
    if version is None:
        return []
    return [what for first, fixed, what in KNOWN_BUGS if first <= version < fixed]
