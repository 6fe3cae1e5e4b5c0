"""How a region shows a stage it pinned (break glass): the pinned version, said loudly.

Pure functions over the pin records of :mod:`modelreg.server.domain.pins`, shared by the reads
(``stages``) and the watch streams (``stage_hub``) of a region's servers.
"""

from __future__ import annotations

from modelreg.server.domain import keys
from modelreg.server.domain.ports import LocalStore
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import store_pb2


def overlay(pointer: res.StagePointer, pin: res.LocalPin) -> res.StagePointer:
    """The pointer as a pinned region serves it: the pin's version, switched to on receipt.

    Everything else stays the primary's (etag, candidates, a pending rollout), and
    ``local_pin.primary_version`` says what the primary names now.
    """
    served = res.StagePointer()
    served.CopyFrom(pointer)
    served.local_pin.CopyFrom(pin)
    served.local_pin.primary_version = pointer.version
    served.version = pin.version
    served.ClearField("activation_time")
    return served


def stored_pin(value: bytes | None) -> store_pb2.StoredPin | None:
    """A pin record as stored, or None for no value."""
    return None if value is None else store_pb2.StoredPin.FromString(value)


def active(value: bytes | None) -> res.LocalPin | None:
    """The pin a stored record puts in force (None: no record, or cleared)."""
    stored = stored_pin(value)
    return None if stored is None or stored.cleared else stored.pin


def stage_key_of(pin_key: str) -> str:
    """``stages/{model}/{stage}`` for the pin key ``pins/{model}/{stage}``."""
    return keys.STAGES_START + pin_key.removeprefix(keys.PINS_START)


async def served_pins(local: LocalStore | None, model_id: str) -> dict[str, res.LocalPin]:
    """The pins in force in this region on a model's stages, by stage id (none: no region)."""
    if local is None:
        return {}
    prefix = keys.pin(model_id, "")
    read = await local.read_local(prefix, keys.prefix_end(prefix))
    found = {}
    for entry in read.entries:
        pin = active(entry.value)
        if pin is not None:
            found[entry.key.removeprefix(prefix)] = pin
    return found
