"""Domain rules of request validation: every field and rule named in the error.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

import pytest

from modelreg.server.domain.errors import (
    InvalidArgumentError,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import (
    MODEL,
    Env,
    digest,
    field_of,
    version_fields,
)


def _with(**changes: object) -> res.ModelVersion:
    mv = version_fields()
    for name, value in changes.items():
        if name == "tags":
            mv.tags.update(value)  # type: ignore[call-overload]
        elif name == "lineage":
            mv.lineage.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(mv, name, value)
    return mv


class TestValidation:
    @pytest.mark.parametrize(
        "model_id",
        ["", "a", "Fraud", "fraud_detector", "-fraud", "fraud-", "1fraud", "x" * 64, "fr aud"],
    )
    async def test_bad_model_id_is_refused(self, env: Env, model_id: str) -> None:
        """A model id that is not a 2-63 character lowercase slug is refused, unwritten."""
        with pytest.raises(InvalidArgumentError) as exc:
            await env.create_model(model_id)
        assert field_of(exc.value) == "model_id"
        assert env.store.commits == 0

    async def test_longest_model_id_is_accepted(self, env: Env) -> None:
        """A 63-character model id is within the limit."""
        model = await env.create_model("m" * 63)
        assert model.name == "models/" + "m" * 63

    @pytest.mark.parametrize(
        ("mv", "field"),
        [
            pytest.param(_with(sha256=digest(1).upper()), "model_version.sha256", id="upper"),
            pytest.param(_with(sha256=digest(1)[:63]), "model_version.sha256", id="short"),
            pytest.param(_with(sha256="sha256:" + digest(1)), "model_version.sha256",
                         id="prefixed"),
            pytest.param(_with(sha256=""), "model_version.sha256", id="missing-digest"),
            pytest.param(_with(artifact_uri="models/fraud.bin"), "model_version.artifact_uri",
                         id="no-scheme"),
            pytest.param(_with(artifact_uri=""), "model_version.artifact_uri", id="no-uri"),
            pytest.param(_with(size_bytes=0), "model_version.size_bytes", id="zero-size"),
            pytest.param(_with(description="é" * 2049), "model_version.description",
                         id="description-4098-bytes"),
            pytest.param(_with(tags={f"k{i}": "v" for i in range(65)}), "model_version.tags",
                         id="65-tags"),
            pytest.param(_with(lineage=res.Lineage(dataset_sha256="abc")),
                         "model_version.lineage.dataset_sha256", id="dataset-digest"),
        ],
    )
    async def test_bad_version_field_is_named(
        self, env: Env, mv: res.ModelVersion, field: str
    ) -> None:
        """Each malformed version field is refused under its exact path, and nothing is written."""
        await env.create_model()
        commits = env.store.commits
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        assert [v.field for v in exc.value.violations] == [field]
        assert exc.value.metadata["field"] == field
        assert env.store.commits == commits
        assert (await env.model()).version_count == 0

    async def test_limits_themselves_are_accepted(self, env: Env) -> None:
        """A 4096-byte description and 64 tags are within the limits."""
        await env.create_model()
        mv = _with(description="a" * 4096, tags={f"k{i}": "v" for i in range(64)})
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        resp = await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        assert resp.model_version.version == 1

    async def test_every_bad_field_is_named_at_once(self, env: Env) -> None:
        """One error names every bad field of the request, not just the first."""
        await env.create_model()
        mv = _with(sha256="XYZ", artifact_uri="nowhere")
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        fields = {v.field for v in exc.value.violations}
        assert fields == {"model_version.artifact_uri", "model_version.sha256"}

    @pytest.mark.parametrize(
        ("model", "field"),
        [
            (res.RegisteredModel(description="x" * 4097), "model.description"),
            (res.RegisteredModel(tags={f"k{i}": "v" for i in range(65)}), "model.tags"),
            (res.RegisteredModel(custom_stages=["latest"]), "model.custom_stages[0]"),
            (res.RegisteredModel(custom_stages=["canary", "staging"]), "model.custom_stages[1]"),
            (res.RegisteredModel(custom_stages=["Canary"]), "model.custom_stages[0]"),
        ],
    )
    async def test_bad_model_field_is_named(
        self, env: Env, model: res.RegisteredModel, field: str
    ) -> None:
        """Each malformed model field is refused under its exact path, and nothing is written."""
        req = svc.CreateModelRequest(model_id=MODEL, model=model)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.models.create(env.call("CreateModel", req), req)
        assert [v.field for v in exc.value.violations] == [field]
        assert env.store.commits == 0

    async def test_overlong_reason_is_refused(self, env: Env) -> None:
        """A promotion reason over 1024 bytes is refused, naming reason, unwritten."""
        await env.setup(1)
        commits = env.store.commits
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("staging", 1, reason="r" * 1025)
        assert field_of(exc.value) == "reason"
        assert env.store.commits == commits
