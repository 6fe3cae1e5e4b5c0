"""Bad input: INVALID_ARGUMENT naming the field, and nothing written to etcd."""

from __future__ import annotations

import aetcd
import grpc
import pytest

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, error_info, make_model, stage, version_message

PARENT = f"models/{MODEL}"

CASES = [
    ("model id with capitals", "CreateModel",
     svc.CreateModelRequest(model_id="Fraud_Detector"), ["model_id"]),
    ("model id too long", "CreateModel",
     svc.CreateModelRequest(model_id="m" * 64), ["model_id"]),
    ("description over 4 KiB", "CreateModel",
     svc.CreateModelRequest(model_id="ok", model=res.RegisteredModel(description="x" * 4097)),
     ["model.description"]),
    ("65 tags", "CreateModel",
     svc.CreateModelRequest(model_id="ok", model=res.RegisteredModel(
         tags={f"t{i}": "v" for i in range(65)})), ["model.tags"]),
    ("digest with uppercase", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(sha256="A" * 64)),
     ["model_version.sha256"]),
    ("digest with prefix", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         sha256="sha256:" + "a" * 64)), ["model_version.sha256"]),
    ("short digest and no size", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         sha256="abc", size_bytes=0)), ["model_version.sha256", "model_version.size_bytes"]),
    ("uri without scheme", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         artifact_uri="/tmp/model.bin")), ["model_version.artifact_uri"]),
    ("model card over 256 KiB", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         model_card="#" * (256 * 1024 + 1))), ["model_version.model_card"]),
    ("param value over 1 KiB", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         params={"lr": "1" * 1025})), ["model_version.params['lr']"]),
    ("non-finite metric", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         metrics={"auc": float("nan")})), ["model_version.metrics['auc']"]),
    ("unknown stage", "PromoteVersion",
     svc.PromoteVersionRequest(name=stage("prodution"), version=1), ["name"]),
    ("stage with bad characters", "PromoteVersion",
     svc.PromoteVersionRequest(name=stage("Prod!"), version=1), ["name"]),
    ("not a stage name", "PromoteVersion",
     svc.PromoteVersionRequest(name="fraud-detector/production", version=1), ["name"]),
    ("version zero", "PromoteVersion",
     svc.PromoteVersionRequest(name=stage("staging"), version=0), ["version"]),
    ("reason over 1 KiB", "PromoteVersion",
     svc.PromoteVersionRequest(name=stage("staging"), version=1, reason="r" * 1025), ["reason"]),
    ("request id not printable", "PromoteVersion",
     svc.PromoteVersionRequest(name=stage("staging"), version=1, request_id="a\nb"),
     ["request_id"]),
    ("negative page size", "ListModels", svc.ListModelsRequest(page_size=-1), ["page_size"]),
    ("foreign page token", "ListModels", svc.ListModelsRequest(page_token="bm9wZQ=="),
     ["page_token"]),
    ("unknown state filter", "ListModelVersions",
     svc.ListModelVersionsRequest(parent=PARENT, state=42), ["state"]),
    ("audit window reversed", "ListAuditEvents",
     svc.ListAuditEventsRequest(start_time={"seconds": 20}, end_time={"seconds": 10}),
     ["end_time"]),
    # Python's `$` matches before a trailing newline: these were accepted and written.
    ("model id with trailing newline", "CreateModel",
     svc.CreateModelRequest(model_id="m1\n"), ["model_id"]),
    ("tag key with trailing newline", "CreateModel",
     svc.CreateModelRequest(model_id="m1", model=res.RegisteredModel(tags={"team\n": "x"})),
     ["model.tags['team\\n']"]),
    ("custom stage with trailing newline", "CreateModel",
     svc.CreateModelRequest(model_id="m1", model=res.RegisteredModel(
         custom_stages=["canary\n"])), ["model.custom_stages[0]"]),
    ("digest with trailing newline", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         sha256="a" * 64 + "\n")), ["model_version.sha256"]),
    ("uri with trailing newline", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         artifact_uri="s3://bucket/key\n")), ["model_version.artifact_uri"]),
    ("uri with non-ASCII", "CreateModelVersion",
     svc.CreateModelVersionRequest(parent=PARENT, model_version=version_message(
         artifact_uri="s3://bucket/caf\u00e9")), ["model_version.artifact_uri"]),
    # str.isdigit and int() accept Unicode digits: superscript 2 crashed, Arabic-Indic 1 meant 1.
    ("superscript version number", "GetModelVersion",
     svc.GetModelVersionRequest(name=f"{PARENT}/versions/\u00b2"), ["name"]),
    ("Arabic-Indic version number", "UpdateModelVersion",
     svc.UpdateModelVersionRequest(
         model_version=res.ModelVersion(name=f"{PARENT}/versions/\u0661", description="d"),
         update_mask={"paths": ["description"]}), ["model_version.name"]),
    # Out-of-range timestamps were stored (and broke every reader) or failed as UNKNOWN.
    ("sunset after year 9999", "UpdateModelVersion",
     svc.UpdateModelVersionRequest(
         model_version=res.ModelVersion(name=f"{PARENT}/versions/1",
                                        sunset_time={"seconds": 253_402_300_800}),
         update_mask={"paths": ["sunset_time"]}), ["model_version.sunset_time.seconds"]),
    ("sunset with negative nanos", "UpdateModelVersion",
     svc.UpdateModelVersionRequest(
         model_version=res.ModelVersion(name=f"{PARENT}/versions/1",
                                        sunset_time={"seconds": 1, "nanos": -1}),
         update_mask={"paths": ["sunset_time"]}), ["model_version.sunset_time.nanos"]),
    ("audit start after year 9999", "ListAuditEvents",
     svc.ListAuditEventsRequest(start_time={"seconds": 10**12}), ["start_time.seconds"]),
    ("audit end with negative nanos", "ListAuditEvents",
     svc.ListAuditEventsRequest(end_time={"seconds": 10, "nanos": -5}), ["end_time.nanos"]),
    # ListAuditEvents names its model like every other request: a resource name in parent.
    ("audit parent not a model name", "ListAuditEvents",
     svc.ListAuditEventsRequest(parent=MODEL), ["parent"]),
    ("audit by the replaced model field", "ListAuditEvents",
     svc.ListAuditEventsRequest(model=MODEL), ["model"]),
]


async def _all_keys(etcd_server, prefix: str) -> dict[bytes, int]:
    async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
        return {kv.key: kv.mod_revision for kv in await client.get_prefix(prefix.encode())}


class TestBadInput:
    @pytest.mark.parametrize(("case", "method", "request_", "fields"), CASES,
                             ids=[c[0] for c in CASES])
    async def test_invalid_argument_names_field(
        self, stub, etcd_server, etcd_prefix, case, method, request_, fields
    ):
        """Each malformed request is INVALID_ARGUMENT naming its fields and writes nothing."""
        await make_model(stub, versions=1)
        before = await _all_keys(etcd_server, etcd_prefix)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, method)(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        _, metadata, got_fields = error_info(caught.value)
        assert got_fields == fields
        assert metadata["field"] == fields[0]
        assert fields[0] in caught.value.details()
        assert await _all_keys(etcd_server, etcd_prefix) == before

    async def test_not_found_and_already_exists(self, stub):
        """Missing resources are NOT_FOUND and taken names ALREADY_EXISTS, with the resource."""
        await make_model(stub, versions=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(svc.GetModelRequest(name="models/nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value)[1]["resource"] == "models/nope"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=9))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value)[1]["resource"] == f"{PARENT}/versions/9"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateModel(svc.CreateModelRequest(model_id=MODEL))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS

    async def test_bad_actor_header(self, server):
        """An unprintable actor header is INVALID_ARGUMENT, not a server error."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            from modelreg.v1 import model_service_pb2_grpc

            raw = model_service_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw.CreateModel(svc.CreateModelRequest(model_id="m1"),
                                      metadata=(("x-modelreg-actor", "x" * 300),))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["x-modelreg-actor"]
