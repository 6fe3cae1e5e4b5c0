r"""What ``--json`` prints: resources and errors in one shape people can script against.

The shape, documented in the README and ``modelreg --help``:

- field names as in the proto (``snake_case``), every field present (zeros included);
- 64-bit integers (versions, revisions, generations) as JSON numbers, not proto3 JSON's
  strings;
- enums as their value name without the enum's prefix, lower-case (``promote``,
  ``production``, ``changes``; ``unspecified`` when unset);
- etags without their quotes (``"11"``, not ``"\"11\""``): ``--etag`` takes either form;
- timestamps as RFC 3339 UTC strings; one outside years 1-9999 (stored by servers before the
  range check, refused by protobuf's JSON printer) as its raw ``seconds`` and ``nanos`` marked
  ``invalid`` rather than failing the whole command;
- a failed command prints ``{"error": {...}}`` on stderr (:func:`error_to_json`).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from modelreg.client.errors import RegistryError

_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
"""The range of ``google.protobuf.Timestamp`` (years 1-9999); JSON and datetime need it."""

_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
"""Types proto3 JSON prints as strings (for JavaScript's 53-bit numbers); we print numbers."""

_Path = list[str | int]


def valid_time(ts: timestamp_pb2.Timestamp) -> bool:
    """Whether ``ts`` is in the Timestamp range (older servers stored any pair of numbers)."""
    return _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999


def unquote_etag(etag: str) -> str:
    """``11`` for the etag ``"11"`` (as the server sends it); anything else as is."""
    if len(etag) >= 2 and etag[0] == etag[-1] == '"':
        return etag[1:-1]
    return etag


def short_enum_name(enum: EnumDescriptor, name: str) -> str:
    """``promote`` for ``POINTER_MOVE_KIND_PROMOTE``: the value without the enum's prefix.

    The prefix is read off the enum's zero value (``POINTER_MOVE_KIND_UNSPECIFIED``, which every
    enum of the API has), so a value added to the proto later needs no change here.
    """
    zero = enum.values_by_number.get(0)
    prefix = zero.name.removesuffix("UNSPECIFIED") if zero is not None else ""
    return name.removeprefix(prefix).lower()


def _raw_time(ts: timestamp_pb2.Timestamp) -> dict[str, Any]:
    return {"seconds": ts.seconds, "nanos": ts.nanos, "invalid": True}


def _clear_invalid_times(message: Message, path: _Path) -> list[tuple[_Path, dict[str, Any]]]:
    """Clears out-of-range Timestamps in ``message`` (in place); returns where they were."""
    found: list[tuple[_Path, dict[str, Any]]] = []
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = list(enumerate(value)) if field.is_repeated else [(None, value)]
        for i, item in items:
            here = [*path, field.name] + ([] if i is None else [i])
            if isinstance(item, timestamp_pb2.Timestamp):
                if not valid_time(item):
                    found.append((here, _raw_time(item)))
                    if i is None:
                        message.ClearField(field.name)
                    else:
                        item.Clear()
            else:
                found += _clear_invalid_times(item, here)
    return found


def _reshape_value(field: FieldDescriptor, value: Any) -> Any:
    """One proto3-JSON value of ``field`` in our shape (numbers, short enums, bare etags)."""
    if field.type in _INT64_TYPES:
        return int(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        # An unknown number (a newer server's value) stays a number.
        if isinstance(value, str) and field.enum_type is not None:
            return short_enum_name(field.enum_type, value)
        return value
    if field.type == FieldDescriptor.TYPE_STRING and field.name == "etag":
        return unquote_etag(value)
    message = field.message_type
    # Well-known types (Timestamp, Struct, ...) keep their JSON form.
    if message is not None and not message.full_name.startswith("google.protobuf."):
        _reshape(message, value)
    return value


def _reshape(descriptor: Any, data: dict[str, Any]) -> None:
    """Rewrite ``data``, ``MessageToDict``'s output for a ``descriptor`` message, in place."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            data[field.name] = {k: _reshape_value(entry, v) for k, v in value.items()}
        elif field.is_repeated:
            data[field.name] = [_reshape_value(field, v) for v in value]
        else:
            data[field.name] = _reshape_value(field, value)


def to_json(message: Message) -> dict[str, Any]:
    """Convert a message to a JSON-ready dict in the shape the module docstring describes."""
    copy = type(message)()
    copy.CopyFrom(message)
    invalid = _clear_invalid_times(copy, [])
    data = json_format.MessageToDict(
        copy, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _reshape(copy.DESCRIPTOR, data)
    for path, raw in invalid:
        parent: Any = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = raw
    return data


def error_to_json(exc: Exception) -> dict[str, Any]:
    """The object ``--json`` prints on stderr for a failed command.

    ``{"error": {"code", "reason", "message", "metadata", "field_violations"}}``, every key
    always present: ``code`` is the gRPC status code name (``FAILED_PRECONDITION``), ``reason``
    the server's ``ErrorInfo.reason`` (``STAGING_REQUIRED``; the code's name when the server
    sent none), ``metadata`` the ``ErrorInfo`` metadata (``current_etag`` without its quotes,
    like every etag), ``field_violations`` ``[{"field", "description"}]`` from
    ``google.rpc.BadRequest``. Input the CLI refuses itself (exit 2) is ``INVALID_ARGUMENT``
    with reason ``USAGE``.
    """
    if not isinstance(exc, RegistryError):
        return {
            "error": {
                "code": "INVALID_ARGUMENT",
                "reason": "USAGE",
                "message": str(exc),
                "metadata": {},
                "field_violations": [],
            }
        }
    meta = dict(exc.metadata)
    if "current_etag" in meta:
        meta["current_etag"] = unquote_etag(meta["current_etag"])
    return {
        "error": {
            "code": exc.code.name,
            "reason": exc.reason,
            "message": exc.message,
            "metadata": meta,
            "field_violations": [{"field": f, "description": d} for f, d in exc.field_violations],
        }
    }
