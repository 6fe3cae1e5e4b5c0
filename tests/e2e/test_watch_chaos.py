"""Chaos: a watch server SIGKILLed and restarted on its port, again and again, under streams
held by several client processes, while another server commits changes; on every etcd build.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelreg.server.embedded_etcd import free_port
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import watch_service_pb2 as ws
from tests.helpers import ActorStub, make_model, start_server
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)
from tests.up_process import wait_serving

CLIENT = Path(__file__).parents[1] / "watch_chaos_client.py"
MODELREG = shutil.which("modelreg", path=str(Path(sys.executable).parent)) or "modelreg"
POINTERS = [("chaos-a", "canary"), ("chaos-a", "staging"), ("chaos-b", "canary")]
SNAPSHOT, CHANGES = ws.WATCH_MESSAGE_TYPE_SNAPSHOT, ws.WATCH_MESSAGE_TYPE_CHANGES
PROCESSES, STREAMS = 3, 30
ITERATIONS = int(os.environ.get("MODELREG_CHAOS_ITERATIONS", "8"))
"""Kill/restart rounds; the suite runs 8 per etcd build, a long run sets more."""



class ServeProcess:
    """``modelreg serve`` in a child process on a fixed port, with a 0.1 s progress interval
    (half its 0.2 s bookmark interval), so etcd is asked for progress right after each watch
    is created: the window of etcd issue 15220.
    """

    def __init__(self, endpoint: str, prefix: str, log: Path) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        self.args = [MODELREG, "serve", "--etcd", endpoint, "--prefix", prefix,
                     "--listen", self.target, "--metrics-listen", "",
                     "--bookmark-interval", "0.2", "--log-level", "warning"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    async def start(self) -> None:
        """Spawns the server and waits until its health says SERVING."""
        self.spawn()
        assert self.proc is not None
        await wait_serving(self.target, self.proc, lambda: self.log.read_text()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _selected(selection: dict[str, Any], name: str) -> bool:
    model, stage = name.split("/")[1], name.split("/")[3]
    return ((not selection.get("models") or model in selection["models"])
            and model.startswith(selection.get("model_prefix", ""))
            and (not selection.get("stages") or stage in selection["stages"]))


def _check(stream: dict[str, Any], committed: list[tuple[int, str, int]]) -> None:
    """Every change once, in revision order, after a snapshot that matches the committed state
    at its revision (a reset snapshot restarts the count); the final state is the committed one.
    """
    assert not stream["error"], stream["error"]
    wanted = [c for c in committed if _selected(stream["selection"], c[1])]

    def state_at(revision: int) -> dict[str, int]:
        return {name: version for rev, name, version in wanted if rev <= revision}

    messages = stream["messages"]
    assert messages and messages[0][0] == SNAPSHOT, messages[:1]
    previous = 0
    seen: list[tuple[int, str, int]] = []
    state: dict[str, int] = {}
    base = 0
    for i, (kind, revision, reset, items, _) in enumerate(messages):
        context = f"messages {max(0, i - 3)}..{i}: {messages[max(0, i - 3):i + 1]}"
        assert revision >= previous, f"revision went back from {previous}; {context}"
        if kind == SNAPSHOT:
            assert reset or previous == 0, "a snapshot in the middle of a stream without reset"
            state, base, seen = dict(items), revision, []
            assert state == state_at(revision)
        elif kind == CHANGES:
            assert revision > previous, f"change at {revision} after {previous}; {context}"
            state.update(items)
            seen.extend((revision, name, version) for name, version in items)
        previous = revision
    assert seen == [c for c in wanted if c[0] > base]
    assert state == state_at(committed[-1][0])


class TestWatchChaos:
    @pytest.mark.slow
    async def test_streams_see_every_change_once_across_sigkills(
            self, etcd_server, etcd_prefix, tmp_path):
        """90 streams in 3 client processes follow a server that is SIGKILLed and restarted
        on its port (8 times in the suite) while a second server commits changes before,
        during and after each outage; each stream resumes from its last revision + 1 and, at
        the end, has seen every change of its selection exactly once, in revision order, and
        ends on the right state.
        """
        rng = random.Random(6)
        served = ServeProcess(etcd_server.endpoint, etcd_prefix, tmp_path / "serve.log")
        writer = await start_server(etcd_server.endpoint, etcd_prefix)
        clients: list[asyncio.subprocess.Process] = []
        try:
            async with grpc.aio.insecure_channel(writer.target) as channel:
                stub = ActorStub(channel, "alice")
                for model in ("chaos-a", "chaos-b"):
                    await make_model(stub, model, versions=3, custom_stages=["canary"])
                current: dict[tuple[str, str], int] = {}
                committed: list[tuple[int, str, int]] = []

                async def move(count: int) -> None:
                    for _ in range(count):
                        model, stage_id = rng.choice(POINTERS)
                        version = rng.choice(
                            [v for v in (1, 2, 3) if v != current.get((model, stage_id))])
                        name = f"models/{model}/stages/{stage_id}"
                        moved = await stub.PromoteVersion(
                            svc.PromoteVersionRequest(name=name, version=version))
                        current[(model, stage_id)] = version
                        committed.append((moved.revision, name, version))

                await move(4)
                await served.start()
                outputs = [tmp_path / f"client-{i}.json" for i in range(PROCESSES)]
                for out in outputs:
                    clients.append(await asyncio.create_subprocess_exec(
                        sys.executable, str(CLIENT), served.target, str(STREAMS), str(out),
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE))
                for _ in range(ITERATIONS):
                    await move(rng.randint(1, 3))  # streams live
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    served.kill()
                    await move(rng.randint(1, 7))  # while the streams' server is down
                    await served.start()
                    await move(rng.randint(0, 2))  # resumed streams catch up meanwhile
                await move(1)
            final = committed[-1][0]
            for client in clients:
                assert client.stdin is not None
                client.stdin.write(f"{final}\n".encode())
                await client.stdin.drain()
            for client in clients:
                async with asyncio.timeout(90):
                    _, err = await client.communicate()
                assert client.returncode == 0, err.decode()[-2000:]
            for out in outputs:
                for stream in json.loads(out.read_text()):
                    assert stream["resumes"] >= ITERATIONS
                    _check(stream, committed)
        finally:
            for client in clients:
                if client.returncode is None:
                    client.kill()
                    await client.wait()
            served.kill()
            await writer.stop()
