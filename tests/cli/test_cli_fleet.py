"""The fleet and watch surface of the client: ``list_nodes``/``rollout_status``/``watch_stages``
and the ``modelreg nodes``, ``rollout`` and ``watch`` commands.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from modelreg.client import (
    AsyncRegistryClient,
    InvalidArgumentError,
    RegistryClient,
    RetryPolicy,
    UnexpectedStatusError,
    cli,
)
from modelreg.client import _commands as cmd
from modelreg.client import _render_fleet as render
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc, watch_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from tests.helpers import MODEL, make_model, stage

MODELREG = shutil.which("modelreg", path=str(Path(sys.executable).parent)) or "modelreg"
PROD = "models/m/stages/production"


def _pointer(version: int, **kw: Any) -> res.StagePointer:
    kw.setdefault("last_move", res.POINTER_MOVE_KIND_PROMOTE)
    return res.StagePointer(name=PROD, version=version, updated_by="alice", **kw)


def _node(node_id: str, *stages: fs.ServedStage, region: str = "eu", **labels: str) -> fs.Node:
    return fs.Node(name=f"nodes/{node_id}", node_id=node_id, region=region, labels=labels,
                   stages=list(stages))


# --------------------------------------------------------------------------------------------
# Pure rendering, requests and argument parsing
# --------------------------------------------------------------------------------------------


class TestRendering:
    def test_stage_label(self) -> None:
        """Stage names shorten to model/stage; anything else passes through."""
        assert render.stage_label(PROD) == "m/production"
        assert render.stage_label("odd") == "odd"

    def test_nodes_table_one_row_per_node_and_stage(self) -> None:
        """A node gets a row per stage it follows, or one row of dashes if it follows none."""
        a = _node(
            "node-a",
            fs.ServedStage(stage=PROD, serving_version=2, prepared_version=3),
            fs.ServedStage(stage="models/m/stages/staging", serving_version=3, prepared_version=3,
                           failed_version=4, error="sha256\nmismatch"),
            pool="gpu", zone="b",
        )
        a.report_time.FromSeconds(1_700_000_000)
        lines = render.nodes_table([a, _node("node-b", region="")]).splitlines()
        assert lines[0].split() == ["NODE", "REGION", "STAGE", "SERVING", "PREPARED", "LAST",
                                    "REPORT", "LABELS", "FAILED"]
        assert lines[1].split() == ["node-a", "eu", "m/production", "v2", "v3",
                                    "2023-11-14T22:13:20Z", "pool=gpu,zone=b", "-"]
        assert lines[2].endswith("v4: sha256 mismatch")
        assert lines[2].split()[:5] == ["node-a", "eu", "m/staging", "v3", "v3"]
        assert lines[3].split() == ["node-b"] + ["-"] * 7

    def test_rollout_text(self) -> None:
        """Summary, then versions with the committed one marked, then the lagging nodes."""
        late = _node("node-c", fs.ServedStage(stage=PROD, serving_version=1, prepared_version=1,
                                              failed_version=2, error="loader error"))
        resp = fs.GetRolloutStatusResponse(
            stage=_pointer(2), total_nodes=4, summary="production -> v2 at revision 9; ...",
            serving=[fs.VersionCount(version=2, nodes=2), fs.VersionCount(version=1, nodes=2)],
            lagging=[late],
        )
        blocks = render.rollout_text(resp).split("\n\n")
        assert blocks[0] == "production -> v2 at revision 9; ..."
        assert [line.split() for line in blocks[1].splitlines()] == [
            ["VERSION", "NODES", "COMMITTED"], ["v2", "2", "yes"], ["v1", "2", "-"]]
        lagging = blocks[2].splitlines()
        assert lagging[0] == "lagging nodes (first 1 of 2):"
        assert lagging[2].split()[:4] == ["node-c", "eu", "v1", "v1"]
        assert lagging[2].endswith("v2: loader error")

    def test_rollout_text_without_nodes(self) -> None:
        """No node follows the stage: the summary alone."""
        resp = fs.GetRolloutStatusResponse(stage=_pointer(2), summary="production -> v2; 0/0")
        assert render.rollout_text(resp) == "production -> v2; 0/0"

    def test_watch_lines_snapshot(self) -> None:
        """A snapshot prints one line per pointer; an empty one says so; reset is flagged."""
        msg = ws.WatchStagesResponse(type=ws.WATCH_MESSAGE_TYPE_SNAPSHOT, revision=7,
                                     snapshot=[_pointer(2, reason="nightly  run")])
        assert render.watch_lines(msg) == [f"7  {PROD}  v2  (snapshot)  by alice  nightly run"]
        msg = ws.WatchStagesResponse(type=ws.WATCH_MESSAGE_TYPE_SNAPSHOT, revision=8, reset=True)
        assert render.watch_lines(msg) == ["8  (reset snapshot: no matching stage pointer yet)"]

    def test_watch_lines_changes(self) -> None:
        """Changes read REVISION NAME FROM -> TO (KIND) by ACTOR REASON; deletions too."""
        msg = ws.WatchStagesResponse(
            type=ws.WATCH_MESSAGE_TYPE_CHANGES, revision=12,
            changes=[
                ws.StageChange(stage=_pointer(3, reason="canary ok"), from_version=2),
                ws.StageChange(stage=_pointer(1), from_version=0),
                ws.StageChange(stage=_pointer(
                    2, last_move=res.POINTER_MOVE_KIND_ROLLBACK, hotfix=True), from_version=3),
                ws.StageChange(stage=res.StagePointer(name=PROD), from_version=2, deleted=True),
            ],
        )
        assert render.watch_lines(msg) == [
            f"12  {PROD}  v2 -> v3  (promote)  by alice  canary ok",
            f"12  {PROD}  - -> v1  (promote)  by alice",
            f"12  {PROD}  v3 -> v2  (rollback, hotfix)  by alice",
            f"12  {PROD}  v2 -> deleted",
        ]

    def test_watch_output_skips_bookmarks_unless_asked(self) -> None:
        """Bookmarks are left out of text and JSON lines unless --bookmarks."""
        msgs = [
            ws.WatchStagesResponse(type=ws.WATCH_MESSAGE_TYPE_SNAPSHOT, revision=5),
            ws.WatchStagesResponse(type=ws.WATCH_MESSAGE_TYPE_BOOKMARK, revision=6),
        ]
        quiet = list(cmd._watch_output(msgs, bookmarks=False))
        assert [o.data["revision"] for o in quiet] == [5]
        loud = list(cmd._watch_output(msgs, bookmarks=True))
        assert [o.text for o in loud][1] == "6  (bookmark)"
        assert loud[1].data["type"] == "bookmark"


class TestRequestsAndArguments:
    # The request shapes are tested with the client (tests/client/test_client_unit.py).
    def test_parser(self) -> None:
        """nodes, rollout and watch take their documented arguments."""
        p = cli.build_parser()
        a = p.parse_args(["watch", "m", "production", "canary", "--from-revision", "5",
                          "--bookmarks", "--json"])
        assert (a.model, a.stage, a.from_revision, a.bookmarks, a.json) == (
            "m", ["production", "canary"], 5, True, True)
        a = p.parse_args(["watch", "m"])
        assert (a.stage, a.from_revision, a.bookmarks) == ([], 0, False)
        a = p.parse_args(["rollout", "m", "production", "--region", "eu"])
        assert (a.model, a.stage, a.region) == ("m", "production", "eu")
        a = p.parse_args(["nodes", "--model", "m"])
        assert (a.model, a.region) == ("m", None)
        help_text = p.format_help()
        assert all(f"\n    {c} " in help_text for c in ("nodes", "rollout", "watch"))

    def test_negative_revision_is_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--from-revision -1 exits 2 without contacting anything."""
        assert cli.main(["--target", "127.0.0.1:1", "watch", "m", "--from-revision", "-1"]) == 2
        assert "--start-revision" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# watch_stages against a scripted in-process WatchService (no etcd)
# --------------------------------------------------------------------------------------------


class FakeWatch(watch_service_pb2_grpc.WatchServiceServicer):
    """Sends a snapshot and one change, then fails the stream with RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.requests: list[tuple[ws.WatchStagesRequest, str]] = []

    async def WatchStages(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(
            (request, dict(context.invocation_metadata()).get("x-modelreg-actor", "")))
        if request.model_prefix == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prefix")
        yield ws.WatchStagesResponse(type=ws.WATCH_MESSAGE_TYPE_SNAPSHOT, revision=3)
        yield ws.WatchStagesResponse(
            type=ws.WATCH_MESSAGE_TYPE_CHANGES, revision=4,
            changes=[ws.StageChange(stage=_pointer(1))])
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too slow")


@pytest.fixture
async def fake_watch() -> AsyncIterator[tuple[FakeWatch, str]]:
    fake = FakeWatch()
    server = aio.server()
    watch_service_pb2_grpc.add_WatchServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


class TestWatchStages:
    async def test_async_one_stream_then_typed_error(
        self, fake_watch: tuple[FakeWatch, str]
    ) -> None:
        """The async stream yields messages in order, then raises a typed error: no reconnect."""
        fake, target = fake_watch
        seen: list[int] = []
        async with AsyncRegistryClient(target, actor="alice", timeout=0.5) as c:
            with pytest.raises(UnexpectedStatusError) as info:
                async for msg in c.watch_stages(models=["m"], stages=["production"]):
                    seen.append(msg.revision)
                    await asyncio.sleep(0.7)  # longer than the client's timeout: no deadline
            with pytest.raises(InvalidArgumentError):
                async for _ in c.watch_stages(model_prefix="bad"):
                    pass
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert seen == [3, 4]
        assert len(fake.requests) == 2
        assert (list(fake.requests[0][0].models), fake.requests[0][1]) == (["m"], "alice")

    async def test_sync_one_stream_then_typed_error(
        self, fake_watch: tuple[FakeWatch, str]
    ) -> None:
        """The blocking stream behaves the same, lazily: nothing is sent before iterating."""
        fake, target = fake_watch

        def work() -> tuple[list[int], BaseException | None, int]:
            seen: list[int] = []
            with RegistryClient(target, retries=RetryPolicy(max_retries=0)) as c:
                stream = c.watch_stages(start_revision=3)
                sent_before = len(fake.requests)
                try:
                    for msg in stream:
                        seen.append(msg.revision)
                except Exception as exc:
                    return seen, exc, sent_before
            return seen, None, sent_before

        seen, err, sent_before = await asyncio.to_thread(work)
        assert sent_before == 0
        assert seen == [3, 4]
        assert isinstance(err, UnexpectedStatusError)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert fake.requests[0][0].start_revision == 3

    async def test_closing_the_iterator_cancels_the_call(
        self, fake_watch: tuple[FakeWatch, str]
    ) -> None:
        """Breaking out early and closing the generator leaves the client usable."""
        _, target = fake_watch
        async with AsyncRegistryClient(target) as c:
            stream = c.watch_stages()
            async for _ in stream:
                break
            await stream.aclose()
            first = [m.revision async for m in _upto(c.watch_stages(), 1)]
        assert first == [3]


async def _upto(stream: AsyncIterator[ws.WatchStagesResponse], n: int) -> AsyncIterator[Any]:
    count = 0
    async for msg in stream:
        yield msg
        count += 1
        if count == n:
            await stream.aclose()
            return


# --------------------------------------------------------------------------------------------
# The installed command against a real server
# --------------------------------------------------------------------------------------------


async def _run(target: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        MODELREG, "--target", target, *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _promote(stub: Any, stage_id: str, version: int) -> svc.PromoteVersionResponse:
    return await stub.PromoteVersion(
        svc.PromoteVersionRequest(name=stage(stage_id), version=version, reason=f"ship {version}"))


# Runs the CLI with SIGINT at its default, as a terminal's foreground job has. A suite started
# in the background of a non-interactive shell (as CI runners may) inherits SIGINT ignored, and
# so would the CLI: Ctrl-C would do nothing. A disposition set to SIG_DFL survives exec. This
# is a trampoline process rather than `preexec_fn`, which runs Python between fork and exec and
# crashed the child when gRPC threads in the test process held locks at the fork.
_AS_AT_A_TERMINAL = (
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
)


class TestCommandsEndToEnd:
    async def test_watch_follows_a_stage(self, server: Any, stub: Any) -> None:
        """`modelreg watch` prints the snapshot, then each promotion as it commits; Ctrl-C
        exits 130; --from-revision --json replays the changes as JSON lines.
        """
        await make_model(stub, versions=2)
        proc = await asyncio.create_subprocess_exec(
            *_AS_AT_A_TERMINAL, MODELREG, "--target", server.target, "watch", MODEL, "production",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                first = (await proc.stdout.readline()).decode()
                assert "(snapshot: no matching stage pointer yet)" in first, (
                    first + (await proc.stderr.read()).decode())
                revisions = []
                for v in (1, 2):
                    await _promote(stub, "staging", v)
                    revisions.append((await _promote(stub, "production", v)).revision)
                lines = [(await proc.stdout.readline()).decode().rstrip() for _ in range(2)]
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
            raise AssertionError(f"`modelreg watch` ignored Ctrl-C for 30 s: {err.decode()}"
                                 ) from None
        prod = stage("production")
        assert lines == [
            f"{revisions[0]}  {prod}  - -> v1  (promote)  by alice  ship 1",
            f"{revisions[1]}  {prod}  v1 -> v2  (promote)  by alice  ship 2",
        ]
        assert code == cli.EXIT_INTERRUPTED

        # Replaying from the first change: no snapshot, JSON lines, until the process is told.
        proc = await asyncio.create_subprocess_exec(
            MODELREG, "--target", server.target, "--json", "watch", MODEL, "production",
            "--from-revision", str(revisions[0]),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(30):
                replay = [json.loads(await proc.stdout.readline()) for _ in range(2)]
        finally:
            proc.terminate()
            await proc.wait()
        assert [m["type"] for m in replay] == ["changes"] * 2
        assert [m["revision"] for m in replay] == revisions
        assert replay[1]["changes"][0]["stage"]["version"] == 2

    async def test_nodes_and_rollout(self, server: Any, stub: Any) -> None:
        """`modelreg nodes` and `modelreg rollout` show what a reported node serves."""
        await make_model(stub, versions=2)
        for v in (1, 2):
            await _promote(stub, "staging", v)
            await _promote(stub, "production", v)
        async with grpc.aio.insecure_channel(server.target) as channel:
            fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
            for node_id, serving in (("node-a", 2), ("node-b", 1)):
                await fleet.ReportNode(fs.ReportNodeRequest(ttl_seconds=60, node=fs.Node(
                    node_id=node_id, region="eu", labels={"pool": "a"},
                    stages=[fs.ServedStage(stage=stage("production"), serving_version=serving,
                                           prepared_version=2)])))

        code, out, err = await _run(server.target, "nodes", "--model", MODEL)
        assert code == 0, err
        rows = [line.split() for line in out.splitlines()]
        assert rows[0][:3] == ["NODE", "REGION", "STAGE"]
        assert [r[:5] for r in rows[1:]] == [
            ["node-a", "eu", f"{MODEL}/production", "v2", "v2"],
            ["node-b", "eu", f"{MODEL}/production", "v1", "v2"],
        ]
        assert rows[1][-2:] == ["pool=a", "-"]

        code, out, err = await _run(server.target, "rollout", MODEL, "production")
        assert code == 0, err
        blocks = out.rstrip("\n").split("\n\n")
        assert "1/2 nodes serve v2" in blocks[0]
        assert blocks[1].splitlines()[1].split() == ["v2", "1", "yes"]
        assert blocks[2].splitlines()[0] == "lagging nodes:"
        assert blocks[2].splitlines()[2].split()[:3] == ["node-b", "eu", "v1"]

        code, out, err = await _run(server.target, "--json", "rollout", MODEL, "production")
        assert code == 0, err
        data = json.loads(out)
        assert (data["total_nodes"], data["stage"]["version"]) == (2, 2)
        assert [n["node_id"] for n in data["lagging"]] == ["node-b"]

        code, out, err = await _run(server.target, "rollout", "no-such-model", "production")
        assert (code, out) == (1, "")
        assert err.startswith("error: NOT_FOUND")
