"""The blocking client is generated from the asyncio one, and the committed output is current."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from modelreg.client import _unasync

ROOT = Path(__file__).resolve().parents[2]


def _copy_client(tmp_path: Path) -> Path:
    for source in _unasync.FILES:
        for name in (source, _unasync.target_name(source)):
            shutil.copy(_unasync.HERE / name, tmp_path / name)
    return tmp_path


class TestGeneratedClient:
    def test_generated_files_are_current(self) -> None:
        """`python -m modelreg.client._unasync --check` finds every generated file current."""
        done = subprocess.run(
            [sys.executable, "-m", "modelreg.client._unasync", "--check"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    def test_check_catches_a_hand_edit(self, tmp_path: Path) -> None:
        """A generated file edited by hand, or left behind by its source, is reported stale."""
        folder = _copy_client(tmp_path)
        assert _unasync.stale(folder) == []
        client = folder / "_sync_client.py"
        client.write_text(client.read_text().replace("def promote(", "def promote_now("))
        source = folder / "_async_models.py"
        source.write_text(source.read_text() + "\n# a change in the source\n")
        problems = _unasync.stale(folder)
        assert [p.split(" ", 1)[0] for p in problems] == ["_sync_models.py", "_sync_client.py"]
        assert "-    def promote_now(" in problems[1]

    def test_check_catches_a_missing_file(self, tmp_path: Path) -> None:
        """A generated file that does not exist is reported, not skipped."""
        folder = _copy_client(tmp_path)
        (folder / "_sync_transport.py").unlink()
        assert [p.split(" ", 1)[0] for p in _unasync.stale(folder)] == ["_sync_transport.py"]

    def test_generated_files_name_their_source(self) -> None:
        """Every generated file starts with a header naming its source and the script."""
        for source in _unasync.FILES:
            text = (_unasync.HERE / _unasync.target_name(source)).read_text()
            first = text.splitlines()[0]
            assert f"client/{source}" in first
            assert "python -m modelreg.client._unasync" in first

    def test_substitutions(self) -> None:
        """Awaits, async blocks, asyncio names and grpc.aio types become their blocking forms."""
        source = (
            "from grpc import aio\n"
            "import asyncio\n"
            "\n"
            "async def f(c: aio.Channel) -> AsyncIterator[int]:\n"
            "    async with self._lock:\n"
            "        await asyncio.sleep(1)\n"
            "    return await AsyncRegistryClient().aclose()\n"
        )
        assert _unasync.unasync(source, "_async_x.py").splitlines()[1:] == [
            "import threading",
            "",
            "def f(c: grpc.Channel) -> Iterator[int]:",
            "    with self._lock:",
            "        time.sleep(1)",
            "    return RegistryClient().close()",
        ]
