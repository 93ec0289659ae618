"""Review of KV.Pipeline on a real raft cluster: exactly-once across paths (a write first
sent unary retried over the pipeline and vice versa, to the leader and to a follower that
forwards each operation)."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from caplab.client import KVClient
from caplab.pipeline_client import Pipeline
from caplab.v1 import kv_pb2, kv_pb2_grpc
from harness.cluster import LocalCluster
from tests.polling import eventually


def _available() -> bool:
    try:
        return hasattr(importlib.import_module("raft.node"), "build_backend")
    except ImportError:
        return False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def raft(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    if not _available():
        pytest.skip("raft is not built")
    c = LocalCluster("raft", 3, tmp_path_factory.mktemp("review-raft"))
    c.start()
    try:
        await c.wait_ready()
        async with KVClient(list(c.endpoints.values()), timeout=3.0, retries=20) as client:
            await client.put("__ready__", b"1")
        yield c
    finally:
        c.close()


async def _roles(c: LocalCluster) -> tuple[str, str]:
    """(leader endpoint, a follower endpoint), once every node knows the leader."""
    eps = list(c.endpoints.values())
    found: dict[str, str] = {}

    async def known() -> bool:
        found.clear()
        for ep in eps:
            async with grpc.aio.insecure_channel(ep) as ch:
                st = await kv_pb2_grpc.ClusterStub(ch).Status(kv_pb2.StatusRequest(), timeout=2)
            found[ep] = st.role
        return list(found.values()).count("leader") == 1 and all(
            r in ("leader", "follower") for r in found.values()
        )

    await eventually(known, 15, 0.2)
    leader = next(ep for ep, r in found.items() if r == "leader")
    follower = next(ep for ep, r in found.items() if r == "follower")
    return leader, follower


@pytest.mark.asyncio(loop_scope="module")
async def test_a_write_is_applied_once_over_either_path_to_any_node(
    raft: LocalCluster,
) -> None:
    leader, follower = await _roles(raft)

    def inc(seq: int) -> kv_pb2.IncrementRequest:
        return kv_pb2.IncrementRequest(
            key="rv/once", delta=1, request_id=kv_pb2.RequestId(client_id="rv", sequence=seq)
        )

    async with (
        grpc.aio.insecure_channel(leader) as lch,
        grpc.aio.insecure_channel(follower) as fch,
    ):
        lpipe, fpipe = Pipeline(lch), Pipeline(fch)
        # unary to the follower (forwarded), then pipelined retries to follower and leader
        first = await kv_pb2_grpc.KVStub(fch).Increment(inc(1), timeout=5)
        again_f = await fpipe.call("increment", inc(1), 5)
        again_l = await lpipe.call("increment", inc(1), 5)
        assert first.value == again_f.value == again_l.value == 1
        # pipelined to the follower first (forwarded per operation), then unary retries
        second = await fpipe.call("increment", inc(2), 5)
        u_l = await kv_pb2_grpc.KVStub(lch).Increment(inc(2), timeout=5)
        u_f = await kv_pb2_grpc.KVStub(fch).Increment(inc(2), timeout=5)
        assert second.value == u_l.value == u_f.value == 2
        assert second.header.forwarded_by  # (it was forwarded)
        got = await lpipe.call(
            "get", kv_pb2.GetRequest(key="rv/once", consistency=kv_pb2.CONSISTENCY_LINEARIZABLE), 5
        )
        assert got.counter == 2
        await lpipe.close()
        await fpipe.close()
