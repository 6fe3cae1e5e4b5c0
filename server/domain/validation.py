"""Request validation: names, sizes and digests, checked before anything is read or written.

Limits keep every value far below etcd's 1.5 MiB request limit (a version record is at most
about 400 KiB with every field at its maximum) and are part of the API contract: the README
lists them. Violations are collected per request, so one error names every bad field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping

from google.protobuf import duration_pb2, timestamp_pb2

from modelreg.server.domain.errors import FieldViolation, InvalidArgumentError, echo
from modelreg.v1 import resources_pb2

# Patterns are used with ``fullmatch`` only: ``$`` also matches before a trailing newline,
# which let "model\n" through to etcd. ``\S`` and ``\d`` would accept Unicode: spelled out.
MODEL_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,61}[a-z0-9]")
STAGE_ID_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
NODE_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
"""Node ids and regions: DNS-label-like, so host names fit."""
SHA256_RE = re.compile(r"[0-9a-f]{64}")
URI_RE = re.compile(r"[a-z][a-z0-9+.-]*://[\x21-\x7e]+")
"""Scheme, ``://`` and printable ASCII without spaces (percent-encode anything else)."""
NUMBER_RE = re.compile(r"[0-9]{1,12}")
"""A decimal number in a resource name: ASCII digits only (``str.isdigit`` accepts ``²``)."""
MIN_TIMESTAMP_SECONDS = -62_135_596_800
"""0001-01-01T00:00:00Z, the first instant a ``google.protobuf.Timestamp`` may hold."""
MAX_TIMESTAMP_SECONDS = 253_402_300_799
"""9999-12-31T23:59:59Z, the last; beyond it JSON, ``datetime`` and the CLI cannot render it."""

BUILTIN_STAGES = ("staging", "production")
RESERVED_STAGES = frozenset({"latest"})
"""Never a stage: a moving ``latest`` pointer is the trap DESIGN.md rules out for serving."""

MAX_DESCRIPTION = 4096
MAX_TAGS = 64
MAX_TAG_VALUE = 256
MAX_URI = 2048
MAX_FRAMEWORK = 64
MAX_SIGNATURE = 64 * 1024
MAX_MAP_ENTRIES = 256
MAX_MAP_KEY = 128
MAX_PARAM_VALUE = 1024
MAX_LINEAGE_FIELD = 256
MAX_MODEL_CARD = 256 * 1024
MAX_REASON = 1024
MAX_ACTOR = 256
MAX_CUSTOM_STAGES = 16
MAX_REQUEST_ID = 128
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
MAX_POLICY_REGIONS = 64
MIN_PREPARE_DEADLINE_NS = 1_000_000_000
MAX_PREPARE_DEADLINE_NS = 24 * 3600 * 1_000_000_000
MAX_ACTIVATION_MARGIN_NS = 60 * 1_000_000_000
FIGURE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
"""A health figure's name (``error_rate``, ``latency.p99_ms``): what nodes report, what a
rollout guard bounds."""
MAX_FIGURES = 32
"""Health figures per stage in a node's report, and bounded by one rollout guard."""
MIN_BAKE_WINDOW_NS = 1_000_000_000
MAX_BAKE_WINDOW_NS = 24 * 3600 * 1_000_000_000
DEFAULT_BAKE_WINDOW_NS = 600 * 1_000_000_000
"""A guard's bake window when its policy leaves it unset: 10 minutes."""
MAX_DURATION_SECONDS = 315_576_000_000
"""The range ``google.protobuf.Duration`` documents: about 10,000 years either way."""


class Violations:
    """Collects field violations and raises them together."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        """Records one bad field."""
        self.items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> None:
        """Records ``field`` as bad unless ``ok``."""
        if not ok:
            self.add(field, description)

    def raise_if_any(self) -> None:
        """Raises ``InvalidArgumentError`` naming every recorded field, if any."""
        if self.items:
            raise InvalidArgumentError(self.items)


def model_id(v: Violations, field: str, value: str) -> None:
    """A model id is a lowercase slug of 2-63 characters."""
    v.check(
        bool(MODEL_ID_RE.fullmatch(value)),
        field,
        f"model id {echo(value)} must be 2-63 characters of a-z, 0-9 and '-', "
        "starting with a letter and not ending with '-'",
    )


def label(v: Violations, field: str, value: str) -> None:
    """A node id or region: 1-63 characters of a-z, 0-9 and '-', like a DNS label."""
    v.check(bool(NODE_ID_RE.fullmatch(value)), field,
            f"{echo(value)} must be 1-63 characters of a-z, 0-9 and '-' (like a host name)")


def stage_id(v: Violations, field: str, value: str) -> None:
    """A stage id is a lowercase slug of 1-32 characters and never ``latest``."""
    if value in RESERVED_STAGES:
        v.add(field,
              f"stage {echo(value)} is reserved: serve a named stage, never a moving 'latest'")
    else:
        v.check(
            bool(STAGE_ID_RE.fullmatch(value)),
            field,
            f"stage {echo(value)} must be 1-32 characters of a-z, 0-9 and '-', "
            "starting with a letter",
        )


def text(v: Violations, field: str, value: str, limit: int) -> None:
    """Free text up to ``limit`` UTF-8 bytes."""
    size = len(value.encode())
    v.check(size <= limit, field, f"is {size} bytes; at most {limit} allowed")


def tags(v: Violations, field: str, value: Mapping[str, str]) -> None:
    """At most 64 tags; keys are short identifiers, values short text."""
    v.check(len(value) <= MAX_TAGS, field, f"has {len(value)} tags; at most {MAX_TAGS} allowed")
    for key, val in value.items():
        v.check(
            bool(TAG_KEY_RE.fullmatch(key)),
            f"{field}[{echo(key)}]",
            "tag keys are 1-63 characters of letters, digits, '.', '_', '/', '-'",
        )
        text(v, f"{field}[{echo(key)}]", val, MAX_TAG_VALUE)


def custom_stages(v: Violations, field: str, value: Iterable[str]) -> None:
    """Custom stages: valid, distinct, not built-in, at most 16."""
    stages = list(value)
    v.check(len(stages) <= MAX_CUSTOM_STAGES, field, f"at most {MAX_CUSTOM_STAGES} custom stages")
    v.check(len(set(stages)) == len(stages), field, "lists a stage twice")
    for i, name in enumerate(stages):
        if name in BUILTIN_STAGES:
            v.add(f"{field}[{i}]", f"{echo(name)} is built in; declare only custom stages")
        else:
            stage_id(v, f"{field}[{i}]", name)


def sha256(v: Violations, field: str, value: str, *, required: bool) -> None:
    """A sha256 digest as 64 lowercase hex characters."""
    if not value and not required:
        return
    v.check(
        bool(SHA256_RE.fullmatch(value)),
        field,
        f"digest {echo(value)} must be 64 lowercase hex characters (sha256)",
    )


def request_id(v: Violations, value: str) -> None:
    """An idempotency key: up to 128 printable ASCII characters."""
    if value:
        ok = len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable()
        v.check(ok, "request_id", f"must be 1-{MAX_REQUEST_ID} printable ASCII characters")


def page_size(v: Violations, value: int) -> int:
    """Returns the effective page size: 0 means the default; over the maximum is capped."""
    v.check(value >= 0, "page_size", "must not be negative")
    if value <= 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def model_version(v: Violations, field: str, mv: resources_pb2.ModelVersion) -> None:
    """Every field of a version to be registered."""
    if not mv.artifact_uri:
        v.add(f"{field}.artifact_uri", "is required")
    else:
        text(v, f"{field}.artifact_uri", mv.artifact_uri, MAX_URI)
        v.check(
            bool(URI_RE.fullmatch(mv.artifact_uri)),
            f"{field}.artifact_uri",
            "must be a URI with a scheme, e.g. file:///models/m.bin or s3://bucket/key",
        )
    sha256(v, f"{field}.sha256", mv.sha256, required=True)
    v.check(mv.size_bytes > 0, f"{field}.size_bytes", "must be positive")
    text(v, f"{field}.framework", mv.framework, MAX_FRAMEWORK)
    text(v, f"{field}.signature", mv.signature, MAX_SIGNATURE)
    text(v, f"{field}.model_card", mv.model_card, MAX_MODEL_CARD)
    text(v, f"{field}.description", mv.description, MAX_DESCRIPTION)
    tags(v, f"{field}.tags", mv.tags)
    for name, entries in (("metrics", len(mv.metrics)), ("params", len(mv.params))):
        v.check(entries <= MAX_MAP_ENTRIES, f"{field}.{name}", f"at most {MAX_MAP_ENTRIES} entries")
    for key, metric in mv.metrics.items():
        text(v, f"{field}.metrics[{echo(key)}]", key, MAX_MAP_KEY)
        v.check(math.isfinite(metric), f"{field}.metrics[{echo(key)}]", "must be a finite number")
    for key, param in mv.params.items():
        text(v, f"{field}.params[{echo(key)}]", key, MAX_MAP_KEY)
        text(v, f"{field}.params[{echo(key)}]", param, MAX_PARAM_VALUE)
    lineage = mv.lineage
    for name in ("training_run", "code_commit", "dataset_version"):
        text(v, f"{field}.lineage.{name}", getattr(lineage, name), MAX_LINEAGE_FIELD)
    sha256(v, f"{field}.lineage.dataset_sha256", lineage.dataset_sha256, required=False)
    if mv.version or mv.state or mv.stages:
        v.add(field, "version, state and stages are assigned by the server; leave them unset")


def timestamp(v: Violations, field: str, ts: timestamp_pb2.Timestamp) -> None:
    """A Timestamp in its documented range: years 1-9999, nanos 0-999,999,999.

    Protobuf stores any pair of numbers; one outside the range breaks every reader that turns
    it into a date (``ToDatetime``, JSON), so it never gets into etcd or a range query.
    """
    v.check(MIN_TIMESTAMP_SECONDS <= ts.seconds <= MAX_TIMESTAMP_SECONDS, f"{field}.seconds",
            "must be within years 0001-9999 (-62135596800 to 253402300799)")
    v.check(0 <= ts.nanos <= 999_999_999, f"{field}.nanos", "must be 0-999999999")


ECHO_KEY = 40
"""Characters of a map key shown in a field path (the path is clipped to 128 anyway)."""


def map_key(field: str, key: str) -> str:
    """A map entry's field path, e.g. ``model.rollout_policies["production"]`` (key shortened).

    JSON-quoted (ASCII), so a hostile key cannot break the path apart or the trailers.
    """
    shown = key if len(key) <= ECHO_KEY else key[:ECHO_KEY] + "..."
    return f"{field}[{json.dumps(shown)}]"


def _duration(v: Violations, field: str, d: duration_pb2.Duration, low_ns: int, high_ns: int,
              what: str) -> None:
    if not (abs(d.seconds) <= MAX_DURATION_SECONDS and abs(d.nanos) <= 999_999_999
            and (d.seconds == 0 or d.nanos == 0 or (d.seconds > 0) == (d.nanos > 0))):
        v.add(field, "is not a valid duration (seconds and nanos of one sign, nanos < 1 s)")
        return
    v.check(low_ns <= d.ToNanoseconds() <= high_ns, field, what)


def rollout_policies(
    v: Violations,
    field: str,
    policies: Mapping[str, resources_pb2.RolloutPolicy],
    *,
    stages: Collection[str],
    regions: Collection[str] | None,
) -> None:
    """Rollout policies by stage: each on a declared stage, with sound figures.

    ``stages`` are the model's stages (built-in and custom, as they will be); ``regions`` the
    deployment's regions, or None when the caller does not know them (then only their form
    is checked).
    """
    for stage, policy in policies.items():
        at = map_key(field, stage)
        if stage not in stages:
            v.add(at, f"stage {echo(stage)} is not a stage of this model; its stages are: "
                  + ", ".join(stages))
        listed = list(policy.regions)
        v.check(len(listed) <= MAX_POLICY_REGIONS, f"{at}.regions",
                f"at most {MAX_POLICY_REGIONS} regions")
        v.check(len(set(listed)) == len(listed), f"{at}.regions", "lists a region twice")
        for i, region in enumerate(listed[:MAX_POLICY_REGIONS]):
            if not NODE_ID_RE.fullmatch(region):
                label(v, f"{at}.regions[{i}]", region)
            elif regions is not None and region not in regions:
                v.add(f"{at}.regions[{i}]", f"{echo(region)} is not a region of this "
                      f"deployment; its regions are: {', '.join(regions)}")
        fraction = policy.readiness_fraction
        v.check(math.isfinite(fraction) and 0.0 <= fraction <= 1.0, f"{at}.readiness_fraction",
                "must be between 0 and 1 (0 means 1: every live node)")
        if policy.HasField("prepare_deadline"):
            _duration(v, f"{at}.prepare_deadline", policy.prepare_deadline,
                      MIN_PREPARE_DEADLINE_NS, MAX_PREPARE_DEADLINE_NS,
                      "must be 1 s to 24 h (unset: 5 minutes)")
        if policy.HasField("activation_margin"):
            _duration(v, f"{at}.activation_margin", policy.activation_margin,
                      0, MAX_ACTIVATION_MARGIN_NS, "must be 0 to 60 s (unset: 2 s)")
        if policy.HasField("guard"):
            rollout_guard(v, f"{at}.guard", policy.guard)


def figures(v: Violations, field: str, values: Mapping[str, float], *, what: str) -> None:
    """Named figures (a node's health, a guard's maxima): at most 32, sound names, finite."""
    v.check(len(values) <= MAX_FIGURES, field,
            f"has {len(values)} figures; at most {MAX_FIGURES} allowed")
    for name, value in values.items():
        at = map_key(field, name)
        v.check(bool(FIGURE_RE.fullmatch(name)), at,
                "figure names are 1-64 characters of a-z, 0-9, '_', '.' and '-', starting "
                "with a letter or digit (e.g. error_rate, latency_p99_ms)")
        v.check(math.isfinite(value), at, f"{what} must be a finite number")


def rollout_guard(v: Violations, field: str, guard: resources_pb2.RolloutGuard) -> None:
    """A rollout guard: figures to bound, and a bake window, breach duration, node fraction.

    A guard without figures is off; then it must say nothing else either, so that a policy
    that looks guarded always is.
    """
    if not guard.max_values:
        if guard.ByteSize():
            v.add(f"{field}.max_values", "name at least one figure and its maximum (e.g. "
                  "error_rate <= 0.05), or leave the guard unset")
        return
    figures(v, f"{field}.max_values", guard.max_values, what="a maximum")
    bake = DEFAULT_BAKE_WINDOW_NS
    if guard.HasField("bake_window"):
        _duration(v, f"{field}.bake_window", guard.bake_window, MIN_BAKE_WINDOW_NS,
                  MAX_BAKE_WINDOW_NS, "must be 1 s to 24 h (unset: 10 minutes)")
        bake = guard.bake_window.ToNanoseconds()
    if guard.HasField("breach_duration"):
        _duration(v, f"{field}.breach_duration", guard.breach_duration, 0, max(bake, 0),
                  "must be 0 up to the bake window "
                  f"({bake / 1e9:g} s{'' if guard.HasField('bake_window') else ', its default'})")
    fraction = guard.node_fraction
    v.check(math.isfinite(fraction) and 0.0 <= fraction <= 1.0, f"{field}.node_fraction",
            "must be between 0 and 1 (0 means 0.5: half the live nodes)")


def number(value: str) -> int:
    """A positive decimal number of ASCII digits, else 0."""
    return int(value) if NUMBER_RE.fullmatch(value) else 0


def version_state(value: int) -> resources_pb2.VersionState.ValueType:
    """Accepts a known VersionState, refusing numbers the enum does not define."""
    if value not in resources_pb2.VersionState.values():
        raise InvalidArgumentError.field("state", f"unknown version state {value}")
    return resources_pb2.VersionState.ValueType(value)
