"""The models a watcher holds: the one serving, the warm previous one, and a prepared one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from modelreg.client._watch_support import LoadedModel

T = TypeVar("T")


@dataclass(frozen=True)
class Prepared(Generic[T]):
    """A loaded model that does not serve (yet)."""

    loaded: LoadedModel[T]
    ahead: bool
    """Loaded while it was a rollout's pending version, before the pointer moved to it."""


class ModelSlots(Generic[T]):
    """``current``, ``previous`` and ``prepared``; and which artifacts a private cache keeps.

    ``(current, previous)`` is replaced as one reference, so no reader sees half a swap. At
    most one model is prepared: a rollout's target, or a version waiting for its activation
    time. A model no slot holds any more loses its artifact when the cache is the watcher's
    own (three files at most, not one per version ever served); dropping the watcher's
    reference is all the release there is: the loader's object goes once the application
    lets go of it too.
    """

    def __init__(self, *, own_cache: bool) -> None:
        self._own_cache = own_cache
        self._pair: tuple[LoadedModel[T] | None, LoadedModel[T] | None] = (None, None)
        self._prepared: Prepared[T] | None = None

    @property
    def current(self) -> LoadedModel[T] | None:
        """The model serving."""
        return self._pair[0]

    @property
    def previous(self) -> LoadedModel[T] | None:
        """The model served before ``current``."""
        return self._pair[1]

    @property
    def prepared(self) -> Prepared[T] | None:
        """The model loaded beside them, if any."""
        return self._prepared

    def ready(self, version: int) -> tuple[LoadedModel[T], str] | None:
        """A loaded model of ``version`` that could serve at once, and where it comes from.

        ``prepared`` (ahead, for a rollout), ``loaded`` (prepared after the pointer moved) or
        ``previous`` (the warm one).
        """
        prepared = self._prepared
        if prepared is not None and prepared.loaded.version == version:
            return prepared.loaded, "prepared" if prepared.ahead else "loaded"
        previous = self._pair[1]
        if previous is not None and previous.version == version:
            return previous, "previous"
        return None

    def keep_prepared(self, loaded: LoadedModel[T], *, ahead: bool) -> None:
        """Hold ``loaded`` as the prepared model (the one it replaces is released)."""
        old, self._prepared = self._prepared, Prepared(loaded, ahead)
        if old is not None and old.loaded is not loaded:
            self._release(old.loaded)

    def drop_prepared_unless(self, *versions: int) -> LoadedModel[T] | None:
        """Release the prepared model unless it is of one of ``versions``; return it if so."""
        prepared = self._prepared
        if prepared is None or prepared.loaded.version in versions:
            return None
        self._prepared = None
        self._release(prepared.loaded)
        return prepared.loaded

    def swap(self, new: LoadedModel[T]) -> LoadedModel[T] | None:
        """Make ``new`` current (one reference assignment) and return the model it replaced."""
        old, dropped = self._pair
        self._pair = (new, old)
        prepared = self._prepared
        if prepared is not None and prepared.loaded is new:
            self._prepared = None
        if dropped is not None and dropped is not new:
            self._release(dropped)
        return old

    def _release(self, model: LoadedModel[T]) -> None:
        held = [m.path for m in (*self._pair, self._prepared and self._prepared.loaded) if m]
        if self._own_cache and model.path not in held:
            model.path.unlink(missing_ok=True)
