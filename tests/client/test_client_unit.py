"""Unit tests of modelreg.client against a tiny in-process grpc.aio server (no etcd)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from modelreg.client import (
    AbortedError,
    AsyncRegistryClient,
    ClientState,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RegistryClient,
    RegistryError,
    RetryPolicy,
    UnavailableError,
    UnexpectedStatusError,
    cli,
    from_rpc_error,
)
from modelreg.client import _render as render
from modelreg.client import _requests as rq
from modelreg.client.errors import ERRORS_BY_CODE
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from modelreg.v1 import model_service_pb2 as pb
from modelreg.v1 import model_service_pb2_grpc as pb_grpc
from modelreg.v1 import resources_pb2 as res

FAST = RetryPolicy(max_retries=3, initial_backoff=0.001, max_backoff=0.002)


def _rich(
    code: int, message: str, reason: str, violations: dict[str, str] | None = None, **metadata: str
) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="modelreg.dev", metadata=metadata))
    details = [info]
    if violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations.items()
                ]
            )
        )
        details.append(bad)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


@dataclass
class FakeService(pb_grpc.ModelServiceServicer, fs_grpc.FleetServiceServicer):
    """ModelService (and FleetService) answering by the model name asked for; records every call."""

    unavailable_left: int = 0
    calls: list[tuple[str, Any, str]] = field(default_factory=list)

    async def _flaky(self, method: str, request: Any, context: Any) -> None:
        actor = dict(context.invocation_metadata()).get("x-modelreg-actor", "")
        self.calls.append((method, request, actor))
        if self.unavailable_left > 0:
            self.unavailable_left -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "etcd is down")

    async def GetModel(self, request: Any, context: Any) -> pb.GetModelResponse:
        await self._flaky("GetModel", request, context)
        if request.name == "models/bad":
            await context.abort_with_status(
                _rich(
                    code_pb2.INVALID_ARGUMENT,
                    "invalid request: name: bad slug",
                    "INVALID_ARGUMENT",
                    {"name": "bad slug"},
                    field="name",
                )
            )
        if request.name == "models/missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "models/missing not found")
        if request.name == "models/boom":
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        return pb.GetModelResponse(model=res.RegisteredModel(name=request.name), revision=7)

    async def ListModels(self, request: Any, context: Any) -> pb.ListModelsResponse:
        await self._flaky("ListModels", request, context)
        start = int(request.page_token or 0)
        names = [f"models/m{i}" for i in range(start, min(start + 2, 5))]
        token = str(start + 2) if start + 2 < 5 else ""
        models = [res.RegisteredModel(name=n) for n in names]
        return pb.ListModelsResponse(models=models, next_page_token=token)

    async def CreateModel(self, request: Any, context: Any) -> pb.CreateModelResponse:
        await self._flaky("CreateModel", request, context)
        return pb.CreateModelResponse(model=res.RegisteredModel(name=f"models/{request.model_id}"))

    async def PromoteVersion(self, request: Any, context: Any) -> pb.PromoteVersionResponse:
        await self._flaky("PromoteVersion", request, context)
        if request.etag == '"1"':
            await context.abort_with_status(
                _rich(code_pb2.ABORTED, "stale etag", "ETAG_MISMATCH", current_etag='"9"')
            )
        await context.abort_with_status(
            _rich(code_pb2.FAILED_PRECONDITION, "version 5 is not in staging", "STAGING_REQUIRED")
        )
        raise AssertionError("unreachable")

    async def UpdateModel(self, request: Any, context: Any) -> pb.UpdateModelResponse:
        await self._flaky("UpdateModel", request, context)
        return pb.UpdateModelResponse()

    async def CreateModelVersion(self, request: Any, context: Any) -> Any:
        await self._flaky("CreateModelVersion", request, context)
        return pb.CreateModelVersionResponse()

    async def UpdateModelVersion(self, request: Any, context: Any) -> Any:
        await self._flaky("UpdateModelVersion", request, context)
        return pb.UpdateModelVersionResponse()

    async def ListAuditEvents(self, request: Any, context: Any) -> pb.ListAuditEventsResponse:
        await self._flaky("ListAuditEvents", request, context)
        return pb.ListAuditEventsResponse()

    # FleetService, on the same server (the client speaks every service on one channel).
    async def ListNodes(self, request: Any, context: Any) -> fs.ListNodesResponse:
        await self._flaky("ListNodes", request, context)
        return fs.ListNodesResponse()

    async def GetRolloutStatus(self, request: Any, context: Any) -> fs.GetRolloutStatusResponse:
        await self._flaky("GetRolloutStatus", request, context)
        return fs.GetRolloutStatusResponse()


@pytest.fixture
async def service() -> AsyncIterator[tuple[FakeService, str]]:
    fake = FakeService()
    server = aio.server()
    pb_grpc.add_ModelServiceServicer_to_server(fake, server)
    fs_grpc.add_FleetServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def client(service: tuple[FakeService, str]) -> AsyncIterator[AsyncRegistryClient]:
    async with AsyncRegistryClient(service[1], actor="alice", retries=FAST, timeout=5) as c:
        yield c


class TestErrorDecoding:
    async def test_invalid_argument_details(self, client: AsyncRegistryClient) -> None:
        """A rich INVALID_ARGUMENT status becomes InvalidArgumentError with field and violations."""
        with pytest.raises(InvalidArgumentError) as info:
            await client.get_model("bad")
        err = info.value
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT
        assert err.reason == "INVALID_ARGUMENT"
        assert err.field == "name"
        assert err.field_violations == [("name", "bad slug")]
        assert err.message == "invalid request: name: bad slug"

    async def test_aborted_carries_current_etag(self, client: AsyncRegistryClient) -> None:
        """A stale etag becomes AbortedError exposing the server's current etag."""
        with pytest.raises(AbortedError) as info:
            await client.promote("m", "production", 5, etag='"1"')
        assert info.value.reason == "ETAG_MISMATCH"
        assert info.value.current_etag == '"9"'

    async def test_failed_precondition_reason_and_text(self, client: AsyncRegistryClient) -> None:
        """A lifecycle refusal keeps its reason and renders as CODE REASON: message."""
        with pytest.raises(FailedPreconditionError) as info:
            await client.promote("m", "production", 5)
        assert info.value.reason == "STAGING_REQUIRED"
        assert (
            str(info.value) == "FAILED_PRECONDITION STAGING_REQUIRED: version 5 is not in staging"
        )

    async def test_plain_status_without_details(self, client: AsyncRegistryClient) -> None:
        """A status without ErrorInfo still maps by code, with the code name as reason."""
        with pytest.raises(NotFoundError) as info:
            await client.get_model("missing")
        assert info.value.reason == "NOT_FOUND"
        assert str(info.value) == "NOT_FOUND: models/missing not found"

    async def test_other_codes_fall_back(self, client: AsyncRegistryClient) -> None:
        """A code without its own class raises UnexpectedStatusError, still a RegistryError."""
        with pytest.raises(UnexpectedStatusError) as info:
            await client.get_model("boom")
        assert info.value.code is grpc.StatusCode.INTERNAL

    async def test_unreachable_server(self) -> None:
        """A server nobody listens on raises UnavailableError, not a raw grpc error."""
        async with AsyncRegistryClient("127.0.0.1:1", retries=0, timeout=2) as c:
            with pytest.raises(UnavailableError):
                await c.get_model("m")

    def test_non_call_error(self) -> None:
        """An RpcError that is not a Call decodes to UNKNOWN instead of crashing."""
        err = from_rpc_error(grpc.RpcError("odd"))
        assert isinstance(err, UnexpectedStatusError)
        assert err.code is grpc.StatusCode.UNKNOWN

    def test_mapping_is_consistent(self) -> None:
        """Every class in the code table defaults to the code it is mapped from."""
        for code, cls in ERRORS_BY_CODE.items():
            assert cls.default_code is code
            assert issubclass(cls, RegistryError)


class TestRetries:
    async def test_read_retried_on_unavailable(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """A read that meets UNAVAILABLE twice succeeds on the third attempt."""
        service[0].unavailable_left = 2
        resp = await client.get_model("m")
        assert resp.revision == 7
        assert [c[0] for c in service[0].calls] == ["GetModel"] * 3

    async def test_mutation_retried_with_same_request_id(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """A mutation is retried with one generated request_id, so the server applies it once."""
        service[0].unavailable_left = 2
        await client.create_model("m")
        ids = {c[1].request_id for c in service[0].calls}
        assert len(service[0].calls) == 3
        assert len(ids) == 1
        assert ids.pop()

    async def test_mutation_without_request_id_not_retried(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """A mutation sent without an idempotency key is never retried."""
        service[0].unavailable_left = 1
        with pytest.raises(UnavailableError) as info:
            await client.create_model("m", request_id="")
        assert info.value.reason == "UNAVAILABLE"
        assert len(service[0].calls) == 1

    async def test_other_codes_not_retried(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """A refusal other than UNAVAILABLE is raised after one attempt."""
        with pytest.raises(FailedPreconditionError):
            await client.promote("m", "production", 5)
        assert len(service[0].calls) == 1

    async def test_retries_exhausted(self, service: tuple[FakeService, str]) -> None:
        """After max_retries retries the last UNAVAILABLE is raised."""
        service[0].unavailable_left = 5
        policy = RetryPolicy(max_retries=1, initial_backoff=0.001)
        async with AsyncRegistryClient(service[1], retries=policy) as c:
            with pytest.raises(UnavailableError):
                await c.get_model("m")
        assert len(service[0].calls) == 2

    def test_backoff_is_bounded_full_jitter(self) -> None:
        """Each delay lies in [0, min(max_backoff, initial * multiplier**n)]."""
        policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, multiplier=2)
        for attempt, bound in [(0, 0.1), (1, 0.2), (2, 0.3), (5, 0.3)]:
            assert all(0 <= policy.backoff(attempt) <= bound for _ in range(50))

    def test_no_retry_past_deadline(self) -> None:
        """No retry is scheduled when the delay would pass the call's deadline."""
        policy = RetryPolicy(initial_backoff=1, max_backoff=1)
        code = grpc.StatusCode.UNAVAILABLE
        assert policy.retry_delay(code, attempt=0, idempotent=True, remaining=0.0) is None
        assert policy.retry_delay(code, attempt=0, idempotent=True, remaining=5) is not None
        assert policy.retry_delay(code, attempt=0, idempotent=False, remaining=5) is None


class TestAsyncClient:
    async def test_actor_and_names_sent(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """Calls carry x-modelreg-actor, and model ids and full names give the same name."""
        await client.get_model("fraud")
        await client.get_model("models/fraud")
        assert [(c[1].name, c[2]) for c in service[0].calls] == [("models/fraud", "alice")] * 2

    def test_actor_defaults_to_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without actor=, $MODELREG_ACTOR identifies the caller."""
        monkeypatch.setenv("MODELREG_ACTOR", "ci-bot")
        assert AsyncRegistryClient().config.actor == "ci-bot"

    async def test_iterates_every_page(self, client: AsyncRegistryClient) -> None:
        """iter_models follows next_page_token to the last page."""
        names = [m.name async for m in client.iter_models(page_size=2)]
        assert names == [f"models/m{i}" for i in range(5)]

    async def test_iteration_takes_the_page_methods_parameters(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """iter_models starts at page_token and sends the page size with every page it reads."""
        names = [m.name async for m in client.iter_models(page_size=2, page_token="2")]
        assert names == ["models/m2", "models/m3", "models/m4"]
        assert [(c[1].page_size, c[1].page_token) for c in service[0].calls] == [(2, "2"), (2, "4")]
        iterate, page = AsyncRegistryClient.iter_audit_events, AsyncRegistryClient.list_audit_events
        assert inspect.signature(iterate).parameters == inspect.signature(page).parameters

    async def test_lifecycle(self, service: tuple[FakeService, str]) -> None:
        """A client opens lazily, closes once, and refuses calls and re-entry once closed."""
        c = AsyncRegistryClient(service[1])
        assert c.state is ClientState.UNOPENED
        await c.get_model("m")
        assert c.state is ClientState.OPENED
        await c.aclose()
        await c.aclose()
        assert c.state is ClientState.CLOSED
        with pytest.raises(RuntimeError, match="closed"):
            await c.get_model("m")
        with pytest.raises(RuntimeError):
            await c.__aenter__()


class TestSyncClient:
    def test_same_surface_as_async(self) -> None:
        """Both clients offer the same public methods with the same parameters."""

        def surface(cls: type) -> dict[str, list[str]]:
            return {
                "close" if name == "aclose" else name: list(inspect.signature(fn).parameters)
                for name in dir(cls)
                if not name.startswith("_") and callable(fn := getattr(cls, name))
            }

        assert surface(RegistryClient) == surface(AsyncRegistryClient)
        # + clear_stage, delete_node (issue 14); list_regions, iter_regions, region_status (8);
        # get_rollout, list_rollouts, iter_rollouts, watch_rollout, cancel_rollout, and break
        # glass's pin_stage, unpin_stage (9)
        assert len(surface(RegistryClient)) == 36

    async def test_errors_and_retries(self, service: tuple[FakeService, str]) -> None:
        """The blocking client decodes rich errors and retries reads like the async one."""

        def work() -> tuple[int, RegistryError]:
            with RegistryClient(service[1], retries=FAST) as c:
                service[0].unavailable_left = 1
                revision = c.get_model("m").revision
                try:
                    c.get_model("bad")
                except RegistryError as exc:
                    return revision, exc
            raise AssertionError("no error raised")

        revision, err = await asyncio.to_thread(work)
        assert revision == 7
        assert isinstance(err, InvalidArgumentError)
        assert err.field == "name"


class TestRequests:
    async def test_update_mask_from_given_args(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """Only arguments that are not None enter the update mask; {} clears tags."""
        await client.update_model("m", tags={}, custom_stages=["canary"], etag='"3"')
        req = service[0].calls[-1][1]
        assert list(req.update_mask.paths) == ["tags", "custom_stages"]
        assert (req.model.name, req.model.etag, list(req.model.custom_stages)) == (
            "models/m", '"3"', ["canary"])
        assert req.request_id

    async def test_empty_update_refused(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """An update naming no field is a local ValueError, not a server round trip."""
        with pytest.raises(ValueError, match="at least one"):
            await client.update_version("m", 1)
        with pytest.raises(ValueError, match="at least one"):
            await client.update_model("m", etag='"2"')
        with pytest.raises(ValueError, match="not both"):
            await client.update_version(
                "m", 1, sunset_time=datetime.now(UTC), clear_sunset_time=True
            )
        assert service[0].calls == []

    async def test_sunset_and_lineage(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """A sunset time is set or cleared through the mask; lineage may be a dict."""
        when = datetime(2030, 1, 1, tzinfo=UTC)
        await client.update_version("m", 2, sunset_time=when)
        await client.update_version("m", 2, clear_sunset_time=True, request_id="x")
        await client.create_version(
            "m", artifact_uri="file:///a", sha256="0" * 64, size_bytes=1, metrics={"auc": 1},
            lineage={"code_commit": "abc"})  # fmt: skip
        (_, set_, _), (_, clear, _), (_, ver, _) = service[0].calls
        assert set_.model_version.name == "models/m/versions/2"
        assert set_.model_version.sunset_time.seconds == int(when.timestamp())
        assert set_.request_id
        assert list(clear.update_mask.paths) == ["sunset_time"]
        assert not clear.model_version.HasField("sunset_time")
        assert clear.request_id == "x"
        assert ver.parent == "models/m"
        assert ver.model_version.lineage.code_commit == "abc"
        assert ver.model_version.metrics["auc"] == 1.0

    async def test_filters_and_times(
        self, client: AsyncRegistryClient, service: tuple[FakeService, str]
    ) -> None:
        """Unset filters stay empty, a model name becomes the parent or the node filter's id."""
        since = datetime(2024, 5, 1, tzinfo=UTC)
        await client.list_audit_events(model="m", start_time=since)
        await client.list_audit_events()
        await client.list_nodes(model="models/m")
        await client.rollout_status("m", "production", region="eu")
        audit, everything, nodes, rollout = [c[1] for c in service[0].calls]
        assert (audit.parent, audit.start_time.seconds) == ("models/m", int(since.timestamp()))
        assert not audit.HasField("end_time")
        assert (everything.parent, everything.actor) == ("", "")
        assert not everything.HasField("start_time")
        assert (nodes.model, nodes.region) == ("m", "")
        assert rollout == fs.GetRolloutStatusRequest(name="models/m/stages/production", region="eu")

    def test_names(self) -> None:
        """Resource names are built from ids and pass through when already full."""
        assert rq.version_name("m", 3) == "models/m/versions/3"
        assert rq.stage_name("models/m", "production") == "models/m/stages/production"
        assert rq.stage_name("m", "models/m/stages/canary") == "models/m/stages/canary"
        assert rq.model_id("models/m") == "m"

    def test_watch_selectors(self) -> None:
        """Model names become ids, stage names become ids, and one string is refused."""
        assert rq.model_ids(["models/m", "n"]) == ["m", "n"]
        assert rq.stage_ids(["models/m/stages/production", "canary"]) == ["production", "canary"]
        assert rq.model_ids(None) == rq.stage_ids(None) == []
        with pytest.raises(TypeError):
            rq.model_ids("m")
        with pytest.raises(TypeError):
            rq.stage_ids("production")


class TestCli:
    def test_global_flags_after_command(self) -> None:
        """--json and --target work after the command as well as before it."""
        args = cli.build_parser().parse_args(["models", "list", "--json", "--target", "h:1"])
        assert (args.json, args.target, args.limit) == (True, "h:1", 0)
        args = cli.build_parser().parse_args(["--json", "status", "m"])
        assert args.json is True
        assert args.model == "m"

    def test_promote_and_audit_arguments(self) -> None:
        """Promote takes MODEL STAGE VERSION; audit --actor filters and does not identify."""
        p = cli.build_parser()
        args = p.parse_args(["promote", "m", "production", "5", "--hotfix", "--reason", "x"])
        assert (args.stage, args.version, args.hotfix, args.reason) == ("production", 5, True, "x")
        args = p.parse_args(["--actor", "me", "audit", "--actor", "bob", "--since", "2024-05-01"])
        assert (args.actor, args.actor_filter) == ("me", "bob")
        assert args.since == datetime(2024, 5, 1)

    def test_usage_errors_exit_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Bad flags and bad K=V exit 2; --help exits 0."""
        assert cli.main(["promote", "m"]) == 2
        assert cli.main(["versions", "create", "m", "--metric", "auc=high"]) == 2
        assert cli.main(["versions", "create", "m", "--sha256", "ab"]) == 2
        assert "give --artifact FILE" in capsys.readouterr().err
        assert cli.main(["promote", "--help"]) == 0

    async def test_exit_codes(
        self, service: tuple[FakeService, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A refusal exits 1 with one error line; an unreachable server exits 3."""
        target = ["--target", service[1], "--timeout", "3"]
        code = await asyncio.to_thread(cli.main, [*target, "promote", "m", "production", "5"])
        assert code == 1
        err = capsys.readouterr().err
        assert err == "error: FAILED_PRECONDITION STAGING_REQUIRED: version 5 is not in staging\n"
        code = await asyncio.to_thread(
            cli.main, ["--target", "127.0.0.1:1", "--timeout", "1", "models", "get", "m"]
        )
        assert code == 3
        assert capsys.readouterr().err.startswith("error: UNAVAILABLE")
        code = await asyncio.to_thread(cli.main, [*target, "--json", "models", "list"])
        assert code == 0
        assert '"name": "models/m4"' in capsys.readouterr().out

    def test_versions_create_from_artifact(self, tmp_path: Any) -> None:
        """--artifact computes sha256 and size of a local file."""
        path = tmp_path / "model.bin"
        path.write_bytes(b"abc")
        digest, size = render.file_digest(path)
        assert size == 3
        assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

    def test_server_commands_pass_through(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Serve and up hand every argument, --help included, to modelreg.server.main."""
        seen: list[list[str]] = []
        fake = types.ModuleType("modelreg.server.main")
        fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "modelreg.server.main", fake)
        monkeypatch.setattr(sys.modules["modelreg.server"], "main", fake, raising=False)
        assert cli.main(["serve", "--etcd", "a:1,b:2", "--help"]) == 0
        assert cli.main(["--json", "up", "--data-dir", "/x"]) == 0
        assert seen == [["serve", "--etcd", "a:1,b:2", "--help"], ["up", "--data-dir", "/x"]]
        assert "serve" in cli.build_parser().format_help()


class TestRendering:
    def test_table_aligns_columns(self) -> None:
        """Columns are padded to their widest cell under upper-case headers."""
        out = render.table(["stage", "version"], [("production", "v5"), ("canary", "-")])
        assert out.splitlines() == ["STAGE       VERSION", "production  v5", "canary      -"]

    def test_stage_rows_and_details(self) -> None:
        """Stage tables show versions and flags; details leave empty fields out."""
        p = res.StagePointer(
            name="models/m/stages/production",
            version=5,
            previous_version=4,
            hotfix=True,
            backfill_required=True,
            etag='"12"',
        )
        row = render.stages_table([p]).splitlines()[1].split()
        assert row[:4] == ["production", "v5", "v4", "hotfix,backfill-required"]
        text = render.stage_details(p)
        assert "reason" not in text
        assert "updated" not in text
        assert text.splitlines()[-1].split() == ["etag:", "12"]

    def test_small_formatters(self) -> None:
        """States, timestamps, versions and key=value parsing render as documented."""
        assert render.state_name(res.VERSION_STATE_ARCHIVED) == "archived"
        assert render.when(res.ModelVersion().create_time) == "-"
        assert render.version_label(0) == "-"
        assert render.parse_key_value("a=b=c") == ("a", "b=c")
        with pytest.raises(argparse.ArgumentTypeError):
            render.parse_key_value("novalue")
        assert render.clip("x" * 60, 10) == "x" * 9 + "…"
