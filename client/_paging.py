"""Iterators over paginated List RPCs (AIP-158), derived from the method that reads one page.

``iter_models = apaged(list_models, lambda page: page.models)`` in a client class gives
``iter_models`` exactly the parameters of ``list_models`` (typed, and in ``help()``), so a
List RPC's filters are written once; ``page_token`` says where iteration starts.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Concatenate, ParamSpec, Protocol, TypeVar


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


_S = TypeVar("_S")
_P = ParamSpec("_P")
_Pg = TypeVar("_Pg", bound=_Page)
_T = TypeVar("_T")


def _describe(iterate: Callable[..., object], list_page: Callable[..., object], kind: str) -> None:
    # What help() and inspect.signature show: the page method's parameters, an iterator result.
    name = "iter_" + list_page.__name__.removeprefix("list_")
    iterate.__name__ = name
    iterate.__qualname__ = list_page.__qualname__.rsplit(".", 1)[0] + "." + name
    iterate.__doc__ = (
        f"Iterate over every item of every page of :meth:`{list_page.__name__}`, from"
        " ``page_token`` on, fetching pages as needed (``timeout`` is per page)."
    )
    signature = inspect.signature(list_page).replace(return_annotation=kind)
    iterate.__signature__ = signature  # type: ignore[attr-defined]


def paged(
    list_page: Callable[Concatenate[_S, _P], _Pg], items: Callable[[_Pg], Iterable[_T]]
) -> Callable[Concatenate[_S, _P], Iterator[_T]]:
    """Return a method yielding ``items(page)`` of every page that ``list_page`` reads."""

    def iterate(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[_T]:
        while True:
            page = list_page(self, *args, **kwargs)
            yield from items(page)
            if not page.next_page_token:
                return
            kwargs["page_token"] = page.next_page_token

    _describe(iterate, list_page, "Iterator")
    return iterate


def apaged(
    list_page: Callable[Concatenate[_S, _P], Awaitable[_Pg]], items: Callable[[_Pg], Iterable[_T]]
) -> Callable[Concatenate[_S, _P], AsyncIterator[_T]]:
    """Return a method yielding ``items(page)`` of every page that ``list_page`` awaits."""

    async def iterate(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> AsyncIterator[_T]:
        while True:
            page = await list_page(self, *args, **kwargs)
            for item in items(page):
                yield item
            if not page.next_page_token:
                return
            kwargs["page_token"] = page.next_page_token

    _describe(iterate, list_page, "AsyncIterator")
    return iterate
