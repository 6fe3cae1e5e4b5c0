"""Iterate over every item of a paginated List RPC (AIP-158), blocking or asyncio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Protocol, TypeVar


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


_P = TypeVar("_P", bound=_Page)
_T = TypeVar("_T")


def pages(fetch: Callable[[str], _P], items: Callable[[_P], Iterable[_T]]) -> Iterator[_T]:
    """Yield the items of every page, calling ``fetch(page_token)`` until the token is empty."""
    token = ""
    while True:
        page = fetch(token)
        yield from items(page)
        token = page.next_page_token
        if not token:
            return


async def apages(
    fetch: Callable[[str], Awaitable[_P]], items: Callable[[_P], Iterable[_T]]
) -> AsyncIterator[_T]:
    """Yield the items of every page, awaiting ``fetch(page_token)`` until the token is empty."""
    token = ""
    while True:
        page = await fetch(token)
        for item in items(page):
            yield item
        token = page.next_page_token
        if not token:
            return
