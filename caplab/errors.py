"""The error model of the caplab contract (see proto/caplab/v1/kv.proto), in one place.

Stores raise :class:`StoreError` subclasses; the servicer turns them into gRPC
statuses with a `caplab-outcome` trailer; the client turns statuses back into
:class:`StoreError` subclasses that keep the definite/unknown distinction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

OUTCOME_KEY = "caplab-outcome"
NOT_APPLIED = "not-applied"
UNKNOWN = "unknown"

# Codes whose meaning does not depend on the trailer.
DEFINITE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


class StoreError(Exception):
    """A request that did not succeed. `definite` is True iff it certainly had no effect."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    definite: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def outcome(self) -> str:
        return NOT_APPLIED if self.definite else UNKNOWN

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(StoreError):
    """Bad input: fix the request."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    definite = True


class FailedPrecondition(StoreError):
    """The store cannot do this (operation, consistency level, or the key's type)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    definite = True


class Unavailable(StoreError):
    """Refused before anything was applied (no leader, no quorum, shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE
    definite = True

    def __init__(
        self, message: str, *, leader_id: str | None = None, leader_address: str | None = None
    ) -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_address = leader_address


class Overloaded(StoreError):
    """Too many requests in flight; not applied."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    definite = True


class OutOfRange(StoreError):
    """An increment would overflow the signed 64-bit counter; not applied."""

    code = grpc.StatusCode.OUT_OF_RANGE
    definite = True


class OutcomeUnknown(StoreError):
    """The operation may or may not have taken effect (now or later)."""

    code = grpc.StatusCode.UNKNOWN
    definite = False

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


class Redirect(Exception):
    """Not an answer: this node cannot serve the request, another node (the Raft leader)
    can. The servicer passes the original request to ``forward(method, request,
    timeout)``, which returns that node's response or raises a StoreError. Forwarding thus
    lives in one place instead of being re-encoded per RPC."""

    def __init__(self, forward: Callable[[str, Any, float | None], Awaitable[Any]]) -> None:
        super().__init__("redirect")
        self.forward = forward


def status_of(exc: BaseException) -> StoreError:
    """What a server answers for an operation that raised ``exc`` (the unary status, or a
    pipeline OperationError): a StoreError as it is; NotImplementedError as UNIMPLEMENTED
    and a Redirect nobody followed as UNAVAILABLE (both not applied); anything else is an
    internal error whose outcome is unknown."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, Redirect):
        return Unavailable("this node cannot serve the request; not applied")
    if isinstance(exc, NotImplementedError):
        err = StoreError(str(exc) or "not implemented")
        err.code, err.definite = grpc.StatusCode.UNIMPLEMENTED, True
        return err
    return OutcomeUnknown(
        f"internal error ({type(exc).__name__}); the outcome is unknown",
        grpc.StatusCode.INTERNAL,
    )


class TransportError(StoreError):
    """The server could not be reached at all: the request never left (definite)."""

    code = grpc.StatusCode.UNAVAILABLE
    definite = True


_BY_CODE: dict[grpc.StatusCode, type[StoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
}

# Messages of transport failures raised by grpc before any byte of the request
# reached a server: the connection could not be established (nothing listening, or the
# name did not resolve). UNAVAILABLE, definitely not applied (kv.proto's error table).
_NEVER_CONNECTED_HINTS = (
    "failed to connect to all addresses",
    "connection refused",
    "connect failed",
    "no route to host",
    "dns resolution failed",
    "errors resolving",  # grpc 1.85: "errors resolving HOST:PORT: [... Domain name not found]"
)


def classify(
    code: grpc.StatusCode, details: str, trailers: Iterable[tuple[str, str | bytes]] | None
) -> StoreError:
    """Turn a gRPC status seen by a client into the matching :class:`StoreError`."""
    outcome = None
    for k, v in trailers or ():
        if k == OUTCOME_KEY:
            outcome = v.decode() if isinstance(v, bytes) else v
    details = details or code.name
    if code in _BY_CODE:
        return _BY_CODE[code](details)
    if code in DEFINITE_CODES:
        err = StoreError(details)
        err.code = code
        err.definite = True
        return err
    if code == grpc.StatusCode.UNAVAILABLE:
        if outcome == NOT_APPLIED:
            return Unavailable(details)
        lowered = details.lower()
        if any(h in lowered for h in _NEVER_CONNECTED_HINTS):
            return TransportError(details)
        return OutcomeUnknown(details, code)
    return OutcomeUnknown(details, code)
