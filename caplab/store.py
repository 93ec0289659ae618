"""What a store implements so that the shared runtime can serve it.

A store (raft, gossip) is its algorithm plus one :class:`StoreBackend`. The
runtime validates every request (caplab.validation), calls the backend with
plain Python values, and maps results and :class:`caplab.errors.StoreError`
exceptions to protobuf (caplab.servicer). Backends never see protobuf client
messages, except Status, which they fill directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import grpc

from caplab import errors
from caplab.clock import SkewableClock
from caplab.security import TlsFiles
from caplab.v1 import kv_pb2
from caplab.validation import RequestId

# Metadata key a node sets when it forwards a client request to the leader, and
# the value of that key for the request being served (set by the servicer, per
# request: grpc.aio runs every request in its own task, hence its own context).
FORWARDED_BY_KEY = "caplab-forwarded-by"
forwarded_by: ContextVar[str] = ContextVar("caplab_forwarded_by", default="")


# The session token of the request being served (kv.proto: the mutations' and Get's
# ``session_token``; empty when the client keeps no session). Set by the servicer per
# request, like ``forwarded_by``; a backend that keeps sessions reads it.
session_token: ContextVar[bytes] = ContextVar("caplab_session_token", default=b"")

MAX_SESSION_TOKEN_BYTES = 16 * 1024


class Consistency(Enum):
    """kv.proto ``Consistency`` (Terry's read guarantees), strongest first."""

    DEFAULT = 0
    LINEARIZABLE = 1  # strong
    LOCAL = 2  # eventual
    BOUNDED_STALENESS = 3
    SESSION = 4
    CONSISTENT_PREFIX = 5
    MONOTONIC_READS = 6
    READ_MY_WRITES = 7


# What a backend serves (or refuses with its own reason) unless it says otherwise
# (``StoreBackend.consistency_levels``); the runtime refuses the rest.
BASIC_LEVELS: frozenset[Consistency] = frozenset(
    {Consistency.DEFAULT, Consistency.LINEARIZABLE, Consistency.LOCAL}
)


@dataclass(frozen=True, slots=True)
class Hlc:
    wall_ms: int
    logical: int
    node_id: str


@dataclass(frozen=True, slots=True)
class Header:
    """Where in its history the answering node was (see kv.proto ResponseHeader)."""

    node_id: str  # the node that answered (the leader, after forwarding)
    term: int = 0  # raft
    index: int = 0  # raft
    hlc: Hlc | None = None  # gossip
    stale_possible: bool = False
    forwarded_by: str = ""
    session_token: bytes = b""  # what the session has seen now (kv.proto ResponseHeader)


@dataclass(frozen=True, slots=True)
class ReadResult:
    header: Header
    value: bytes | int | None  # bytes: register, int: counter, None: absent


@dataclass(frozen=True, slots=True)
class DeleteResult:
    header: Header
    existed: bool


@dataclass(frozen=True, slots=True)
class CasResult:
    header: Header
    swapped: bool
    current: bytes | None  # the register before the operation (None: absent)


@dataclass(frozen=True, slots=True)
class IncrementResult:
    header: Header
    value: int


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """How a node was started (`caplab node ...`)."""

    store: str  # "raft" | "gossip"
    node_id: str
    listen: str  # HOST:PORT this node serves on
    peers: dict[str, str]  # other node id -> HOST:PORT used to reach it
    data_dir: str
    enable_admin: bool = False
    # Store-specific tuning (flags like --heartbeat-ms), parsed by the store.
    options: dict[str, str] = field(default_factory=dict)
    advertise: str = ""  # address others and clients should use; defaults to listen
    # Where the peer services listen (and requests forwarded to a leader arrive); "": on
    # ``listen``, beside the client services (plaintext only: ``caplab node --insecure``).
    peer_listen: str = ""
    # This node's member certificate, key and the cluster CA: with it, the peer listener
    # requires mutual TLS and every peer channel presents it (see caplab.auth).
    tls: TlsFiles | None = None
    client_tls: bool = False  # serve clients over TLS too (with the member certificate)
    # With client_tls: require a client certificate (its OU is the role). Without it grpc
    # does not even ask for one, so TLS clients authenticate by bearer token.
    client_certs_required: bool = False
    # Require a bearer token or client certificate on the client listener (roles).
    client_tokens: Mapping[str, tuple[str, str]] | None = None


def parse_int_options(
    store: str,
    known: Collection[str],
    options: Mapping[str, str],
    may_be_zero: Collection[str] = (),
) -> dict[str, int]:
    """A store's `--set NAME=VALUE` tuning: known names, integer values, >= 1 (or >= 0
    for the names in `may_be_zero`); anything else is INVALID_ARGUMENT saying why."""
    values: dict[str, int] = {}
    for name, text in options.items():
        if name not in known:
            raise errors.InvalidArgument(
                f"unknown {store} option {name!r}; known: {', '.join(sorted(known))}"
            )
        try:
            values[name] = int(text)
        except ValueError:
            raise errors.InvalidArgument(
                f"{store} option {name} must be an integer, got {text!r}"
            ) from None
        low = 0 if name in may_be_zero else 1
        if values[name] < low:
            raise errors.InvalidArgument(f"{store} option {name} must be >= {low}")
    return values


class StoreBackend(Protocol):
    """A store as the runtime sees it. Every method may raise StoreError."""

    kind: int  # kv_pb2.StoreKind value
    clock: SkewableClock
    # The read levels this backend handles (serves, waits for, or refuses with its own
    # reason); the runtime answers the others FAILED_PRECONDITION. Default BASIC_LEVELS.
    consistency_levels: frozenset[Consistency]

    async def start(self, server: grpc.aio.Server) -> None:
        """Open storage, register peer services on `server`, start background work."""

    async def before_shutdown(self) -> None:
        """Shutdown step 1, while still serving: hand over leadership (raft), stop gossiping."""

    def stop_peer_streams(self) -> None:
        """Shutdown step 2, as the server stops taking calls: end incoming peer streams
        (they never end by themselves, so the server's grace period would wait for them)."""

    async def close(self) -> None:
        """Shutdown step 3, after in-flight requests finished: flush and close storage."""

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header: ...

    async def get(
        self,
        key: str,
        consistency: Consistency,
        timeout: float | None,
        *,
        max_staleness_ms: int = 0,  # BOUNDED_STALENESS only (> 0, checked by the runtime)
    ) -> ReadResult: ...

    async def delete(
        self, key: str, rid: RequestId | None, timeout: float | None
    ) -> DeleteResult: ...

    async def compare_and_swap(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        rid: RequestId | None,
        timeout: float | None,
    ) -> CasResult: ...

    async def increment(
        self, key: str, delta: int, rid: RequestId | None, timeout: float | None
    ) -> IncrementResult: ...

    async def status(self) -> kv_pb2.StatusResponse: ...

    def dump(self, start_after: str, limit: int) -> AsyncIterator[kv_pb2.DumpEntry]: ...


BackendFactory = Callable[[NodeConfig, SkewableClock], StoreBackend]
