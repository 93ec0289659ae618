"""The client's retry policy: only failures that cannot duplicate an effect are retried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from caplab import errors
from caplab.client import KVClient, is_retryable
from caplab.v1 import kv_pb2, kv_pb2_grpc
from harness.cluster import free_ports


class Scripted(kv_pb2_grpc.KVServicer):
    """Fails with the scripted (code, outcome) list, then succeeds; records every attempt."""

    def __init__(self) -> None:
        self.script: list[tuple[grpc.StatusCode, str | None]] = []
        self.attempts: list[kv_pb2.PutRequest | kv_pb2.GetRequest] = []

    async def _maybe_fail(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.script:
            code, outcome = self.script.pop(0)
            md = (("caplab-outcome", outcome),) if outcome else ()
            await context.abort(code, f"scripted {code.name}", trailing_metadata=md)

    async def Put(
        self, request: kv_pb2.PutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.PutResponse:
        self.attempts.append(request)
        await self._maybe_fail(context)
        return kv_pb2.PutResponse()

    async def Get(
        self, request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kv_pb2.GetResponse:
        self.attempts.append(request)
        await self._maybe_fail(context)
        return kv_pb2.GetResponse(found=True, value=b"v")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    server = grpc.aio.server()
    servicer = Scripted()  # type: ignore[abstract]
    kv_pb2_grpc.add_KVServicer_to_server(servicer, server)
    port = free_ports(1)[0]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


NA = "not-applied"


@pytest.mark.parametrize(
    "failure, retried",
    [
        ((grpc.StatusCode.UNAVAILABLE, NA), True),
        ((grpc.StatusCode.RESOURCE_EXHAUSTED, None), True),
        ((grpc.StatusCode.INVALID_ARGUMENT, None), False),
        ((grpc.StatusCode.FAILED_PRECONDITION, None), False),
        ((grpc.StatusCode.OUT_OF_RANGE, None), False),
    ],
)
async def test_definite_failures(
    scripted: tuple[Scripted, str], failure: tuple[grpc.StatusCode, str | None], retried: bool
) -> None:
    servicer, ep = scripted
    servicer.script = [failure]
    async with KVClient([ep], retries=3, timeout=2.0) as c:
        if retried:
            await c.put("k", b"v")
            assert len(servicer.attempts) == 2
        else:
            with pytest.raises(errors.StoreError) as info:
                await c.put("k", b"v")
            assert info.value.definite
            assert len(servicer.attempts) == 1


async def test_unknown_outcome_of_a_mutation_is_retried_with_the_same_sequence(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, ep = scripted
    servicer.script = [(grpc.StatusCode.UNKNOWN, "unknown"), (grpc.StatusCode.UNAVAILABLE, None)]
    async with KVClient([ep], retries=3, timeout=2.0, client_id="c1") as c:
        await c.put("k", b"v")
    seqs = [
        (a.request_id.client_id, a.request_id.sequence)
        for a in servicer.attempts
        if isinstance(a, kv_pb2.PutRequest)
    ]
    assert seqs == [("c1", 1)] * 3


async def test_no_retries_by_default(scripted: tuple[Scripted, str]) -> None:
    servicer, ep = scripted
    servicer.script = [(grpc.StatusCode.UNAVAILABLE, NA)]
    async with KVClient([ep]) as c:
        with pytest.raises(errors.Unavailable):
            await c.put("k", b"v")
    assert len(servicer.attempts) == 1


async def test_retries_stop_after_the_budget(scripted: tuple[Scripted, str]) -> None:
    servicer, ep = scripted
    servicer.script = [(grpc.StatusCode.UNAVAILABLE, NA)] * 10
    async with KVClient([ep], retries=2, timeout=2.0) as c:
        with pytest.raises(errors.Unavailable):
            await c.get("k")
    assert len(servicer.attempts) == 3


async def test_definite_refusal_moves_to_the_next_endpoint(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, ep = scripted
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    async with KVClient([dead, ep], retries=2, timeout=2.0) as c:
        r = await c.get("k")
    assert r.value == b"v"
    assert len(servicer.attempts) == 1


def test_policy_table() -> None:
    assert is_retryable(errors.Unavailable("x"), idempotent=False)
    assert is_retryable(errors.TransportError("x"), idempotent=False)
    assert not is_retryable(errors.OutcomeUnknown("x"), idempotent=False)
    assert is_retryable(errors.OutcomeUnknown("x"), idempotent=True)
    assert not is_retryable(errors.InvalidArgument("x"), idempotent=True)
    assert not is_retryable(ValueError("x"), idempotent=True)


async def test_a_refusal_after_an_unknown_outcome_is_still_unknown(
    scripted: tuple[Scripted, str],
) -> None:
    """Issue 15: "timed out (may be applied)" then "refused" was reported as "definitely
    not applied" (tenacity re-raises the last attempt's error): the mutation may have been
    applied by the first attempt, so the outcome is unknown. A read has no effect: its
    last error stands."""
    servicer, ep = scripted
    refused = (grpc.StatusCode.UNAVAILABLE, NA)
    servicer.script = [(grpc.StatusCode.DEADLINE_EXCEEDED, None), refused, refused]
    async with KVClient([ep], retries=2, timeout=2.0, client_id="c1") as c:
        with pytest.raises(errors.OutcomeUnknown) as err:
            await c.put("k", b"v")
    assert "may have been applied" in err.value.message
    assert len(servicer.attempts) == 3
    servicer.script = [(grpc.StatusCode.UNAVAILABLE, None), refused, refused]
    async with KVClient([ep], retries=2, timeout=2.0) as c:
        with pytest.raises(errors.Unavailable):
            await c.get("k")
