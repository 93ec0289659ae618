"""A single-process dictionary backend used to test the shared runtime in isolation.

It is not a store (no replication); it exists so that validation, the error model,
the servicers and admin gating can be tested without either real store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from caplab.clock import SkewableClock
from caplab.errors import FailedPrecondition, Unavailable
from caplab.store import (
    BASIC_LEVELS,
    CasResult,
    Consistency,
    DeleteResult,
    Header,
    IncrementResult,
    NodeConfig,
    ReadResult,
)
from caplab.v1 import kv_pb2
from caplab.validation import RequestId, check_counter_result


class MemBackend:
    kind: int = kv_pb2.STORE_KIND_RAFT
    consistency_levels = BASIC_LEVELS

    def __init__(self, config: NodeConfig, clock: SkewableClock) -> None:
        self.config = config
        self.clock = clock
        self.data: dict[str, bytes | int] = {}
        self.refuse: str | None = None  # when set, every mutation is refused with this reason
        self.seen: dict[str, int] = {}
        self.applied = 0

    def _h(self) -> Header:
        return Header(node_id=self.config.node_id, term=1, index=self.applied)

    def _mutate(self, rid: RequestId | None) -> bool:
        if self.refuse:
            raise Unavailable(self.refuse)
        if rid is not None:
            if self.seen.get(rid.client_id, 0) >= rid.sequence:
                return False
            self.seen[rid.client_id] = rid.sequence
        self.applied += 1
        return True

    async def start(self, server: grpc.aio.Server) -> None:
        pass

    async def before_shutdown(self) -> None:
        pass

    def stop_peer_streams(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def put(
        self, key: str, value: bytes, rid: RequestId | None, timeout: float | None
    ) -> Header:
        if isinstance(self.data.get(key), int):
            raise FailedPrecondition(f"key {key!r} holds a counter; use Increment")
        if self._mutate(rid):
            self.data[key] = value
        return self._h()

    async def get(
        self,
        key: str,
        consistency: Consistency,
        timeout: float | None,
        *,
        max_staleness_ms: int = 0,
    ) -> ReadResult:
        return ReadResult(self._h(), self.data.get(key))

    async def delete(self, key: str, rid: RequestId | None, timeout: float | None) -> DeleteResult:
        existed = key in self.data
        if self._mutate(rid):
            self.data.pop(key, None)
        return DeleteResult(self._h(), existed)

    async def compare_and_swap(
        self,
        key: str,
        expected: bytes | None,
        new: bytes,
        rid: RequestId | None,
        timeout: float | None,
    ) -> CasResult:
        cur = self.data.get(key)
        if isinstance(cur, int):
            raise FailedPrecondition(f"key {key!r} holds a counter")
        ok = cur == expected
        if self._mutate(rid) and ok:
            self.data[key] = new
        return CasResult(self._h(), ok, cur)

    async def increment(
        self, key: str, delta: int, rid: RequestId | None, timeout: float | None
    ) -> IncrementResult:
        cur = self.data.get(key, 0)
        if isinstance(cur, bytes):
            raise FailedPrecondition(f"key {key!r} holds a register; use Put")
        new = check_counter_result(cur, delta, key)
        if self._mutate(rid):
            self.data[key] = new
        return IncrementResult(self._h(), new)

    async def status(self) -> kv_pb2.StatusResponse:
        return kv_pb2.StatusResponse(node_id=self.config.node_id, keys=len(self.data))

    async def dump(self, start_after: str, limit: int) -> AsyncIterator[kv_pb2.DumpEntry]:
        n = 0
        for key in sorted(self.data):
            if key <= start_after or (limit and n >= limit):
                continue
            n += 1
            yield kv_pb2.DumpEntry(key=key)
