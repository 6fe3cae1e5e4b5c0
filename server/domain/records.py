"""Encoding of stored values and page tokens, shared by every operation.

Values are protobuf messages with their derived fields (``etag``, ``revision``, ``state``,
``stages``) cleared before they are stored and filled in from the key's ``mod_revision`` when
they are read, so a stored value can never disagree with etcd about its own revision.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from modelreg.server.domain import validation
from modelreg.server.domain.errors import EtagMismatchError, InvalidArgumentError
from modelreg.server.domain.ports import Entry, ModelStore
from modelreg.server.domain.transaction import etag

M = TypeVar("M", bound=Message)

_DERIVED = ("etag", "revision", "state", "stages")
SCAN_BUDGET = 10 * validation.MAX_PAGE_SIZE
"""Keys one filtered listing call may scan before it returns a token."""


def encode(message: Message) -> bytes:
    """The stored form of a resource: derived fields cleared."""
    copy = type(message)()
    copy.CopyFrom(message)
    for name in _DERIVED:
        if name in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    return copy.SerializeToString(deterministic=True)


def decode(entry: Entry, cls: type[M]) -> M:
    """A stored resource with its etag (or revision, for history and audit) filled in."""
    message = cls.FromString(entry.value)
    fields = message.DESCRIPTOR.fields_by_name
    if "etag" in fields:
        message.etag = etag(entry.mod_revision)  # type: ignore[attr-defined]
    elif "revision" in fields:
        message.revision = entry.mod_revision  # type: ignore[attr-defined]
    return message


def check_etag(given: str, resource: str, entry: Entry | None) -> None:
    """Raises EtagMismatchError if the caller gave an etag and it is not the current one."""
    current = etag(entry.mod_revision) if entry is not None else etag(0)
    if given and given != current:
        raise EtagMismatchError(resource, given, current)


def encode_token(key: str) -> str:
    """An opaque page token: the last key returned."""
    return base64.urlsafe_b64encode(key.encode()).decode()


def decode_token(token: str, start: str, end: str) -> str | None:
    """The key after which the next page starts, or None for the first page.

    A token is only good for the range it came from; anything else is ``INVALID_ARGUMENT``.
    """
    if not token:
        return None
    try:
        key = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        key = ""
    if not start <= key < end:
        raise InvalidArgumentError.field("page_token", "is not a token from this list; start over")
    return key


@dataclass(frozen=True)
class Listing:
    """One page of a listing, with the revision it was read at."""

    entries: list[Entry]
    next_token: str
    revision: int


async def list_page(
    store: ModelStore,
    start: str,
    end: str,
    *,
    page_size: int,
    token: str,
    reverse: bool = False,
    accept: Callable[[Entry], bool] | None = None,
) -> Listing:
    """Reads one page of ``[start, end)`` in key order (or reverse), resuming from ``token``.

    With ``accept``, the page holds matching entries only; a call scans at most
    ``SCAN_BUDGET`` keys and then hands back a token (and possibly a short page), so one
    request never walks an unbounded range.
    """
    after = decode_token(token, start, end)
    lo, hi = start, end
    if after is not None:
        if reverse:
            hi = after
        else:
            lo = after + "\0"
    found: list[Entry] = []
    revision = scanned = 0
    while True:
        limit = page_size - len(found) if accept is None else validation.MAX_PAGE_SIZE
        page = await store.scan(lo, hi, limit=limit, reverse=reverse)
        revision = max(revision, page.revision)
        for i, entry in enumerate(page.entries):
            if accept is None or accept(entry):
                found.append(entry)
                if len(found) == page_size:
                    rest = page.more or i < len(page.entries) - 1
                    return Listing(found, encode_token(entry.key) if rest else "", revision)
        scanned += len(page.entries)
        if not page.more or not page.entries:
            return Listing(found, "", revision)
        last = page.entries[-1].key
        if reverse:
            hi = last
        else:
            lo = last + "\0"
        if scanned >= SCAN_BUDGET:
            return Listing(found, encode_token(last), revision)
