"""Conformance suite: what every caplab store must do behind the shared contract.

Runs against a real 3-node cluster of each store (real processes, real gRPC).
Store-specific expectations (the AP store's refusals) are spelled out where they
differ.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from caplab import errors
from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.cluster import LocalCluster
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

STORES = ["raft", "gossip"]


def _available(store: str) -> bool:
    try:
        module = importlib.import_module(f"{store}.node")
    except ImportError:
        return False
    return hasattr(module, "build_backend")


# the clusters whose tests use the pipelined client path
PIPELINED: dict[LocalCluster, bool] = {}


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=[(store, path) for store in STORES for path in ("unary", "pipelined")],
    ids=lambda p: "-".join(p),
)
async def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalCluster]:
    store, path = request.param
    if not _available(store):
        pytest.skip(f"the {store} store is not built yet")
    root: Path = tmp_path_factory.mktemp(f"conf-{store}")
    c = LocalCluster(store, 3, root, enable_admin=True)
    PIPELINED[c] = path == "pipelined"
    c.start()
    try:
        await c.wait_ready()
        async with KVClient(list(c.endpoints.values()), timeout=3.0, retries=20) as client:
            # Wait until the store accepts writes (raft: a leader is elected).
            await client.put("__ready__", b"1")
        yield c
    finally:
        c.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(cluster: LocalCluster) -> AsyncIterator[KVClient]:
    """A client of the cluster's path: every promise holds over KV.Pipeline as over unary
    RPCs (a cluster per path: the tests reuse their keys)."""
    async with KVClient(
        list(cluster.endpoints.values()),
        timeout=3.0,
        retries=10,
        pipeline=PIPELINED.get(cluster, False),
    ) as c:
        yield c


def is_raft(cluster: LocalCluster) -> bool:
    return cluster.store == "raft"


async def test_put_then_get(cluster: LocalCluster, client: KVClient) -> None:
    await client.put("conf/a", b"1")
    got = await client.get("conf/a")
    assert (got.found, got.value) == (True, b"1")
    assert got.header.store == (
        kv_pb2.STORE_KIND_RAFT if is_raft(cluster) else kv_pb2.STORE_KIND_GOSSIP
    )


async def test_every_node_eventually_sees_a_write(cluster: LocalCluster, client: KVClient) -> None:
    await client.put("conf/spread", b"x")
    for ep in cluster.endpoints.values():
        async with KVClient([ep], timeout=2.0) as one:

            async def seen(one: KVClient = one) -> bool:
                r = await one.get("conf/spread", kv_pb2.CONSISTENCY_LOCAL)
                return r.value == b"x"

            await eventually(seen, 10.0)


async def test_delete(client: KVClient) -> None:
    await client.put("conf/del", b"x")
    await client.delete("conf/del")
    assert not (await client.get("conf/del")).found


async def test_counter(client: KVClient) -> None:
    await client.increment("conf/ctr", 5)
    await client.increment("conf/ctr", -2)
    got = await client.get("conf/ctr")
    assert got.value == 3


async def test_type_conflict_names_the_type(client: KVClient) -> None:
    await client.increment("conf/typed", 1)
    with pytest.raises(errors.FailedPrecondition, match="counter"):
        await client.put("conf/typed", b"x")
    await client.put("conf/reg", b"x")
    with pytest.raises(errors.FailedPrecondition, match="register"):
        await client.increment("conf/reg", 1)


async def test_bad_input_is_refused(client: KVClient) -> None:
    with pytest.raises(errors.InvalidArgument):
        await client.put("", b"x")
    with pytest.raises(errors.InvalidArgument):
        await client.put("k" * 1025, b"x")
    with pytest.raises(errors.InvalidArgument):
        await client.put("k", b"x" * (1024 * 1024 + 1))


async def test_overflow(client: KVClient) -> None:
    await client.increment("conf/big", 2**63 - 1)
    with pytest.raises(errors.OutOfRange):
        await client.increment("conf/big", 1)


async def test_cas(cluster: LocalCluster, client: KVClient) -> None:
    if is_raft(cluster):
        r = await client.cas("conf/cas", None, b"a")
        assert r.swapped
        r = await client.cas("conf/cas", b"zzz", b"b")
        assert not r.swapped and r.current == b"a"
        r = await client.cas("conf/cas", b"a", b"b")
        assert r.swapped
        assert (await client.get("conf/cas")).value == b"b"
    else:
        with pytest.raises(errors.FailedPrecondition, match="available"):
            await client.cas("conf/cas", None, b"a")


async def test_linearizable_read(cluster: LocalCluster, client: KVClient) -> None:
    if is_raft(cluster):
        await client.put("conf/lin", b"v")
        r = await client.get("conf/lin", kv_pb2.CONSISTENCY_LINEARIZABLE)
        assert r.value == b"v" and not r.header.stale_possible
    else:
        with pytest.raises(errors.FailedPrecondition, match="available"):
            await client.get("conf/lin", kv_pb2.CONSISTENCY_LINEARIZABLE)


async def test_local_read_is_labelled(client: KVClient) -> None:
    await client.put("conf/local", b"v")
    r = await client.get("conf/local", kv_pb2.CONSISTENCY_LOCAL)
    assert r.header.stale_possible


async def test_retried_mutation_applies_once(cluster: LocalCluster) -> None:
    ep = next(iter(cluster.endpoints.values()))
    async with KVClient([ep], timeout=3.0, retries=10, client_id="conf-dedup") as c:
        req = kv_pb2.IncrementRequest(
            key="conf/once",
            delta=1,
            request_id=kv_pb2.RequestId(client_id="conf-dedup", sequence=1),
        )
        first = await c.kv().Increment(req, timeout=3.0)
        again = await c.kv().Increment(req, timeout=3.0)
        assert first.value == again.value == 1
        assert (await c.get("conf/once")).value == 1


async def test_status_and_digest_agree_after_quiescence(
    cluster: LocalCluster, client: KVClient
) -> None:
    await client.put("conf/digest", b"d")

    async def one_digest() -> bool:
        digests = set()
        for ep in cluster.endpoints.values():
            st = await client.status(ep)
            assert st.node_id in cluster.endpoints
            assert st.state_digest
            digests.add(st.state_digest)
        return len(digests) == 1

    await eventually(one_digest, 10.0)


async def test_dump_lists_keys(client: KVClient) -> None:
    await client.put("conf/dump", b"d")
    # Dump shows the contacted node's own state, which may lag by a heartbeat.

    async def dumped() -> bool:
        entries = await client.dump()
        keys = [e.key for e in entries]
        assert keys == sorted(keys)
        return any(e.key == "conf/dump" and e.value == b"d" for e in entries)

    await eventually(dumped, 10.0)


async def test_admin_clock_skew(cluster: LocalCluster, client: KVClient) -> None:
    ep = next(iter(cluster.endpoints.values()))
    assert await client.set_clock_skew(1500, ep) == 1500
    assert (await client.status(ep)).clock_skew_ms == 1500
    await client.set_clock_skew(0, ep)


async def test_unreachable_node_is_a_definite_failure(cluster: LocalCluster) -> None:
    async with KVClient(["127.0.0.1:1"], timeout=1.0) as c:
        with pytest.raises(errors.StoreError) as info:
            await c.get("k")
    assert info.value.definite
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
