"""Write the blocking client from the asyncio one: ``python -m modelreg.client._unasync [--check]``.

The asyncio modules are the source; each ``_async_X.py`` in :data:`FILES` becomes
``_sync_X.py`` by the line-by-line substitutions of :data:`SUBS`, as encode/httpcore's
``scripts/unasync.py`` does. ``--check`` writes nothing and exits 1 when a generated file is
missing or differs from what the source gives (``tests/client/test_unasync.py`` runs it), and
every substitution must be used somewhere, so the table cannot rot.

The script imports nothing from the package: when a stale generated file breaks
``import modelreg.client``, run it by path instead, ``python client/_unasync.py``.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
"""The ``client/`` folder (resolved: editable installs reach it through a symlink tree)."""

FILES = ("_async_transport.py", "_async_models.py", "_async_client.py")
"""Sources, in the package folder; each is written to its ``_sync_`` twin."""

SUBS: Sequence[tuple[str, str]] = (
    # Imports that change name and would leave the sorted order ruff's isort checks.
    (
        r"^from collections\.abc import AsyncIterator, Callable$",
        "from collections.abc import Callable, Iterator",
    ),
    (r"^import asyncio$", "import threading"),
    (r"^from grpc import aio$", ""),
    (r"\basyncio\.Lock\b", "threading.Lock"),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\baio\.", "grpc."),
    (r"\b(\w+Service)AsyncStub\b", r"\1Stub"),
    (r"\b(_?)async_(\w)", r"\1sync_\2"),
    (r"\bAsync([A-Z]\w*)", r"\1"),
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    # `for x in call: yield x` is what ruff's UP028 wants as `yield from`: not in the source.
    (r"^(\s*)async for (\w+) in (\w+):$", r"\1for \2 in \3:  # noqa: UP028 (from an async for)"),
    (r"\bawait ", ""),
    (r"\baclose\b", "close"),
    (r"\bapaged\b", "paged"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"  # noqa: ASYNC109$", ""),
    # Prose.
    (
        r"^The asyncio source of a blocking twin \(edit here, then run$",
        "Generated from an asyncio twin (edit that one, then run",
    ),
    (r"\basyncio client\b", "blocking client"),
    (r"\bbetween tasks\b", "between threads"),
    (r"\bfor asyncio\b", "for threads"),
)
"""``(regex, replacement)``, applied in order to every line; a line they empty is dropped."""

_COMPILED = [(re.compile(regex), repl) for regex, repl in SUBS]

HEADER = "# Generated from client/{source} by `python -m modelreg.client._unasync`: do not edit.\n"


def target_name(source: str) -> str:
    """Return the generated file's name for a source file name (``_async_x`` -> ``_sync_x``)."""
    return source.replace("_async_", "_sync_", 1)


def unasync(text: str, source: str, used: set[int] | None = None) -> str:
    """Return the blocking twin of asyncio module ``text``, headed by its origin ``source``.

    Args:
        text: The asyncio module's source code.
        source: Its file name, for the header.
        used: Collects the indexes of the substitutions that changed a line.

    """
    out = [HEADER.format(source=source)]
    for line in text.splitlines(keepends=True):
        body, newline = line.rstrip("\n"), line[len(line.rstrip("\n")) :]
        new = body
        for index, (regex, repl) in enumerate(_COMPILED):
            changed = regex.sub(repl, new)
            if changed != new and used is not None:
                used.add(index)
            new = changed
        if new.strip() or not body.strip():
            out.append(new + newline)
    return "".join(out)


def generate(folder: Path = HERE) -> tuple[dict[Path, str], list[str]]:
    """Return each generated file's path and expected text, and the unused substitutions."""
    used: set[int] = set()
    expected = {
        folder / target_name(source): unasync((folder / source).read_text(), source, used)
        for source in FILES
    }
    unused = [SUBS[i][0] for i in range(len(SUBS)) if i not in used]
    return expected, unused


def stale(folder: Path = HERE) -> list[str]:
    """Return a message (with a diff) per generated file that is missing or out of date."""
    expected, unused = generate(folder)
    problems = [f"substitution never used: {regex!r}" for regex in unused]
    for path, text in expected.items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{path.name} (on disk)",
                f"{path.name} (generated)",
                n=1,
            )
            problems.append(f"{path.name} is stale:\n" + "".join(list(diff)[:40]))
    return problems


def main(argv: Sequence[str]) -> int:
    """Write the generated files, or with ``--check`` only compare them; return the exit code."""
    if "--check" in argv:
        problems = stale()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python -m modelreg.client._unasync", file=sys.stderr)
        return 1 if problems else 0
    expected, unused = generate()
    if unused:
        print(f"substitutions never used: {unused}", file=sys.stderr)
        return 1
    for path, text in expected.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
