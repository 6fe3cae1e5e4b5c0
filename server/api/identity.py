"""Today's identity: the ``x-modelreg-actor`` header, everyone allowed; and how handlers see it.

``HeaderAuthenticator`` takes the caller at its word (there is no authentication yet: any
client may name any actor), which is what the audit trail has recorded so far. ``AllowAll``
lets every principal call every RPC. Both sit behind the domain's ``Authenticator`` and
``Authorizer`` ports, so a real scheme replaces them without touching a handler.

The interceptor puts the principal of the call being handled in a context variable
(:func:`principal`): each RPC runs in its own asyncio task with its own copy of the context,
so handlers of concurrent calls, streams included, each see their own caller.
"""

from __future__ import annotations

from contextvars import ContextVar

from modelreg.server.domain import validation
from modelreg.server.domain.errors import InvalidArgumentError
from modelreg.server.domain.identity import Caller, Permission, Principal

ACTOR_HEADER = "x-modelreg-actor"
"""Metadata naming the caller until authentication lands; recorded in every audit event."""
ANONYMOUS = Principal("anonymous")
"""The principal of a caller that names none."""

_principal: ContextVar[Principal] = ContextVar("modelreg_principal")


def principal() -> Principal:
    """The principal of the RPC being handled, as the interceptor authenticated it."""
    try:
        return _principal.get()
    except LookupError:
        raise RuntimeError("no principal: handlers run only behind the RPC interceptor") from None


def set_principal(who: Principal) -> None:
    """Makes ``who`` the principal of the rest of the current task (the interceptor's job)."""
    _principal.set(who)


class HeaderAuthenticator:
    """The caller is whoever its ``x-modelreg-actor`` header names (``anonymous`` if none)."""

    async def authenticate(self, caller: Caller) -> Principal:
        """The header's value, checked for length and printable characters."""
        for key, value in caller.metadata:
            if key == ACTOR_HEADER:
                text = value if isinstance(value, str) else value.decode(errors="replace")
                if not text or len(text) > validation.MAX_ACTOR or not text.isprintable():
                    raise InvalidArgumentError.field(
                        ACTOR_HEADER,
                        f"metadata must be 1-{validation.MAX_ACTOR} printable characters",
                    )
                return Principal(text)
        return ANONYMOUS


class AllowAll:
    """Every principal may call every RPC (no roles yet)."""

    async def authorize(self, principal: Principal, method: str, permission: Permission) -> None:
        """Always allows."""
