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
from modelreg.server.domain.errors import InvalidArgumentError, UnauthenticatedError
from modelreg.server.domain.identity import Caller, Permission, Principal

ACTOR_HEADER = "x-modelreg-actor"
"""Metadata naming the caller until authentication lands; recorded in every audit event."""
FORWARDED_ACTOR_HEADER = "x-modelreg-forwarded-actor"
"""The principal a forwarding server vouches for: a regional server forwarding a mutation to
the primary sends its caller's principal here, in place of the caller's own headers."""
FORWARDED_BY_HEADER = "x-modelreg-forwarded-by"
"""The region of the server that forwarded a call (logs, and a loop a topology mix-up would
make: a server outside the primary never forwards a forwarded call again)."""
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


def header(caller: Caller, name: str) -> str | None:
    """The value of metadata ``name`` (the first, if repeated), or None."""
    for key, value in caller.metadata:
        if key == name:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _actor(name: str, text: str) -> str:
    if not text or len(text) > validation.MAX_ACTOR or not text.isprintable():
        raise InvalidArgumentError.field(
            name, f"metadata must be 1-{validation.MAX_ACTOR} printable characters")
    return text


class HeaderAuthenticator:
    """The caller is whoever its ``x-modelreg-actor`` header names (``anonymous`` if none).

    A call forwarded by a regional server names its principal in ``x-modelreg-forwarded-actor``
    instead, accepted only from a forwarding server (:meth:`forwarder`).
    """

    async def authenticate(self, caller: Caller) -> Principal:
        """The header's value, checked for length and printable characters."""
        forwarded = header(caller, FORWARDED_ACTOR_HEADER)
        if forwarded is not None:
            via = await self.forwarder(caller)
            return Principal(_actor(FORWARDED_ACTOR_HEADER, forwarded), via=via)
        actor = header(caller, ACTOR_HEADER)
        return ANONYMOUS if actor is None else Principal(_actor(ACTOR_HEADER, actor))

    async def forwarder(self, caller: Caller) -> str:
        """The forwarding server that vouches for the call's forwarded principal.

        The seam where a forwarded principal is accepted. Today it is trusted on the same
        basis as ``x-modelreg-actor``, the header identity every caller has now: a call that
        says a server forwarded it (``x-modelreg-forwarded-by`` names its region) is believed,
        because any client could name any actor anyway. Once servers authenticate (issue 10),
        this must require the forwarding server's own credential (its client certificate or
        token, with a role that may forward) and refuse any other caller, so that a client can
        never set the forwarded principal itself (DESIGN.md, Security).

        Raises:
            UnauthenticatedError: The call does not come from a forwarding server.

        """
        via = header(caller, FORWARDED_BY_HEADER)
        if not via:
            raise UnauthenticatedError(
                f"{FORWARDED_ACTOR_HEADER} is accepted only from a forwarding modelreg server "
                f"(which sends {FORWARDED_BY_HEADER}); clients name themselves in "
                f"{ACTOR_HEADER}")
        return _actor(FORWARDED_BY_HEADER, via)


class AllowAll:
    """Every principal may call every RPC (no roles yet)."""

    async def authorize(self, principal: Principal, method: str, permission: Permission) -> None:
        """Always allows."""
