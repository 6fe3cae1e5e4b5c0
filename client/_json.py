"""Resources as JSON for ``--json``, total over every record a server may have stored.

Protobuf's JSON printer refuses a Timestamp outside years 1-9999, which servers before the
range check stored as given; one such field must not turn a whole listing into a traceback.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
"""The range of ``google.protobuf.Timestamp`` (years 1-9999); JSON and datetime need it."""

_Path = list[str | int]


def valid_time(ts: timestamp_pb2.Timestamp) -> bool:
    """Whether ``ts`` is in the Timestamp range (older servers stored any pair of numbers)."""
    return _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999


def _raw_time(ts: timestamp_pb2.Timestamp) -> dict[str, Any]:
    return {"seconds": str(ts.seconds), "nanos": ts.nanos, "invalid": True}


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


def to_json(message: Message) -> dict[str, Any]:
    """Convert a message to a JSON-ready dict, with proto field names and every field present.

    A Timestamp outside its range, which protobuf's JSON printer refuses, is shown as its raw
    ``seconds`` and ``nanos`` marked ``invalid`` rather than failing the whole command.
    """
    copy = type(message)()
    copy.CopyFrom(message)
    invalid = _clear_invalid_times(copy, [])
    data = json_format.MessageToDict(
        copy, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for path, raw in invalid:
        parent: Any = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = raw
    return data
