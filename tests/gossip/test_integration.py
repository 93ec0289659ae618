"""The gossip store end to end: real node processes, real gRPC, links through TCP proxies.

Partitions (both sides accept writes; digests converge after heal; counters add up;
deletes stick), SIGKILL + restart (acknowledged writes, dedup entries and the HLC
survive; the node catches up), and clock skew (the HLC keeps causal order).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
import pytest_asyncio

from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.cluster import LocalCluster, free_ports
from harness.proxy import LinkMode, ProxyNet
from tests.polling import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.harness_loop,  # (its proxies)
]

NODES = ["n1", "n2", "n3"]
FAST = [
    "--set=anti_entropy_interval_ms=300",
    "--set=suspicion_timeout_ms=600",
]


class Net:
    def __init__(self, cluster: LocalCluster, proxies: ProxyNet) -> None:
        self.cluster = cluster
        self.proxies = proxies
        self.clients: dict[str, KVClient] = {
            n: KVClient([ep], timeout=3.0) for n, ep in cluster.endpoints.items()
        }

    def partition(self, *sides: Iterable[str]) -> None:
        groups = [set(s) for s in sides]
        cut = [
            (a, b)
            for i, ga in enumerate(groups)
            for j, gb in enumerate(groups)
            if i != j
            for a in ga
            for b in gb
        ]
        self.proxies.apply(cut, LinkMode.DROP)

    async def digests(self, nodes: Iterable[str] = NODES) -> dict[str, bytes]:
        return {n: (await self.clients[n].status()).state_digest for n in nodes}

    async def converged(self, nodes: Iterable[str] = NODES) -> bool:
        return len(set((await self.digests(nodes)).values())) == 1


@contextlib.asynccontextmanager
async def running_net(root: Path) -> AsyncIterator[Net]:
    """Three gossip nodes (admin on, fast timers) whose links go through proxies."""
    both = free_ports(2 * len(NODES))
    ports, peer_ports = both[: len(NODES)], both[len(NODES) :]
    proxies = ProxyNet(dict(zip(NODES, peer_ports, strict=True)))
    await proxies.start()
    cluster = LocalCluster(
        "gossip",
        len(NODES),
        root,
        ports=ports,
        peer_ports=peer_ports,
        peer_addresses=proxies.peer_addresses,
        enable_admin=True,
        extra_args=FAST,
    )
    cluster.start()
    n = Net(cluster, proxies)
    try:
        await cluster.wait_ready()
        yield n
    finally:
        for c in n.clients.values():
            await c.close()
        cluster.close()
        await proxies.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    async with running_net(tmp_path_factory.mktemp("gossip-it")) as n:
        yield n


@pytest_asyncio.fixture(loop_scope="module")
async def healed(net: Net) -> AsyncIterator[Net]:
    net.proxies.heal()
    yield net
    net.proxies.heal()


async def test_partition_both_sides_write_then_converge(healed: Net) -> None:
    net = healed
    c1, c2, c3 = (net.clients[n] for n in NODES)
    await c1.put("p/del", b"old")
    await c1.increment("p/ctr", 10)

    async def everyone_has_del() -> bool:
        for c in (c1, c2, c3):
            r = await c.get("p/del")
            if r.value != b"old" or (await c.get("p/ctr")).value != 10:
                return False
        return True

    await eventually(everyone_has_del, 20.0)
    net.partition(["n1"], ["n2", "n3"])
    # Both sides accept writes (AP).
    await c1.put("p/a", b"from-n1")
    await c1.increment("p/ctr", 3)
    await c1.delete("p/del")
    await c2.put("p/b", b"from-n2")
    await c2.increment("p/ctr", 4)
    await c3.increment("p/ctr", -1)
    assert (await c1.get("p/ctr")).value == 13
    # The majority side converges internally but not with n1 ...
    await eventually(lambda: net.converged(["n2", "n3"]), 20.0)
    d = await net.digests()
    assert d["n1"] != d["n2"]
    assert not (await c2.get("p/a")).found
    assert (await c2.get("p/del")).value == b"old"
    # ... and everyone converges after the heal.
    net.proxies.heal()
    await eventually(net.converged, 20.0)
    for c in (c1, c2, c3):
        assert (await c.get("p/a")).value == b"from-n1"
        assert (await c.get("p/b")).value == b"from-n2"
        assert (await c.get("p/ctr")).value == 10 + 3 + 4 - 1
        assert not (await c.get("p/del")).found
    dumps = [await net.clients[n].dump() for n in NODES]
    assert dumps[0] == dumps[1] == dumps[2]
    entry = next(e for e in dumps[0] if e.key == "p/ctr")
    # components are named node/epoch (the epoch of that copy of the node's data)
    assert {c.split("/")[0]: v for c, v in entry.counter_increments.items()} == {"n1": 13, "n2": 4}
    assert {c.split("/")[0]: v for c, v in entry.counter_decrements.items()} == {"n3": 1}
    assert next(e for e in dumps[0] if e.key == "p/del").tombstone


async def test_sigkill_keeps_acknowledged_writes_and_catches_up(healed: Net) -> None:
    net = healed
    c3 = net.clients["n3"]
    net.partition(["n3"], ["n1", "n2"])  # the writes below exist only on n3's disk
    hdrs = [(await c3.put(f"k/{i}", b"v%d" % i)).header for i in range(100)]
    rid = kv_pb2.RequestId(client_id="it-dedup", sequence=7)
    inc = kv_pb2.IncrementRequest(key="k/ctr", delta=5, request_id=rid)
    first = await c3.kv().Increment(inc, timeout=3.0)
    last_hlc = max((h.hlc.wall_ms, h.hlc.logical) for h in [*hdrs, first.header])
    await net.clients["n1"].put("k/while-down", b"x")

    node = net.cluster.nodes["n3"]
    node.kill()
    node.start()
    await net.cluster.wait_ready(nodes=["n3"])
    net.proxies.reset_links_to(["n3"])
    # Every acknowledged write survived the SIGKILL (n3 is still cut off: from its disk).
    for i in range(100):
        assert (await c3.get(f"k/{i}")).value == b"v%d" % i
    # The retried increment is answered from the persisted dedup table, not re-applied.
    again = await c3.kv().Increment(inc, timeout=3.0)
    assert again.value == first.value == 5
    assert (again.header.hlc.wall_ms, again.header.hlc.logical) == (
        first.header.hlc.wall_ms,
        first.header.hlc.logical,
    )
    assert (await c3.get("k/ctr")).value == 5
    # The HLC high-water mark survived: new timestamps are above every acknowledged one,
    # even with the physical clock set far back.
    await c3.set_clock_skew(-60_000)
    try:
        after = await c3.increment("k/ctr2", 1)
    finally:
        await c3.set_clock_skew(0)
    assert (after.header.hlc.wall_ms, after.header.hlc.logical) > last_hlc
    # After the heal it catches up (and the others get its writes).
    net.proxies.heal()
    await eventually(net.converged, 20.0)
    assert (await c3.get("k/while-down")).value == b"x"
    assert (await net.clients["n1"].get("k/99")).value == b"v99"


async def test_clock_skew_keeps_causal_order(healed: Net) -> None:
    net = healed
    c1, c2 = net.clients["n1"], net.clients["n2"]
    await c2.set_clock_skew(-5000)
    try:
        w1 = await c1.put("skew/k", b"first")

        async def n2_read_first() -> bool:
            return (await c2.get("skew/k")).value == b"first"

        await eventually(n2_read_first, 20.0)
        w2 = await c2.put("skew/k", b"second")  # causally after "first" ...
        assert time.time() * 1000 - 5000 < w1.header.hlc.wall_ms + 1000  # n2's clock is behind
        h1, h2 = w1.header.hlc, w2.header.hlc
        assert (h2.wall_ms, h2.logical) > (h1.wall_ms, h1.logical)  # ... so it wins (HLC)
        await eventually(net.converged, 20.0)
        for n in NODES:
            assert (await net.clients[n].get("skew/k")).value == b"second"
        assert (await c2.status()).clock_skew_ms == -5000
    finally:
        await c2.set_clock_skew(0)
