"""The Raft store with real processes over gRPC, faults through the harness's TCP proxies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from caplab import errors
from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.cluster import LocalCluster, free_ports
from harness.proxy import ProxyNet
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.harness_loop]  # (its proxies)


class Net:
    def __init__(self, cluster: LocalCluster, proxies: ProxyNet) -> None:
        self.cluster = cluster
        self.proxies = proxies

    @property
    def eps(self) -> dict[str, str]:
        return self.cluster.endpoints

    def client(self, node: str, **kw: float) -> KVClient:
        return KVClient([self.eps[node]], timeout=kw.get("timeout", 3.0))

    async def status(self, node: str) -> kv_pb2.StatusResponse:
        async with self.client(node, timeout=1.0) as c:
            return await c.status()

    async def leader(self, among: list[str] | None = None, timeout: float = 15.0) -> str:
        """A node that says it is leader (and that a majority of `among` agrees on)."""
        nodes = among or list(self.eps)
        found: list[str] = []

        async def elected() -> bool:
            seen = []
            for n in nodes:
                try:
                    st = await self.status(n)
                except errors.StoreError:
                    continue
                seen.append((st.role, st.node_id, st.leader_id))
            leaders = [nid for role, nid, _ in seen if role == "leader"]
            if len(leaders) != 1:
                return False
            agree = sum(1 for _, _, lid in seen if lid == leaders[0])
            if agree * 2 <= len(nodes):
                return False
            found[:] = leaders
            return True

        await eventually(elected, timeout)
        return found[0]

    def partition(self, *groups: list[str]) -> None:
        side = {n: i for i, g in enumerate(groups) for n in g}
        blocked = [(a, b) for a in side for b in side if a != b and side[a] != side[b]]
        self.proxies.apply(blocked)


async def start_net(tmp_path: Path, n: int, extra: list[str] | None = None) -> Net:
    both = free_ports(2 * n)
    ports, peer_ports = both[:n], both[n:]
    proxies = ProxyNet({f"n{i + 1}": p for i, p in enumerate(peer_ports)})
    await proxies.start()
    cluster = LocalCluster(
        "raft",
        n,
        tmp_path,
        ports=ports,
        peer_ports=peer_ports,
        peer_addresses=proxies.peer_addresses,
        extra_args=extra or [],
    )
    cluster.start()
    await cluster.wait_ready()
    return Net(cluster, proxies)


@pytest.fixture
async def net3(tmp_path: Path) -> AsyncIterator[Net]:
    net = await start_net(tmp_path, 3, ["--set", "snapshot_entries=100"])
    yield net
    net.cluster.close()
    await net.proxies.close()


@pytest.fixture
async def net5(tmp_path: Path) -> AsyncIterator[Net]:
    net = await start_net(tmp_path, 5)
    yield net
    net.cluster.close()
    await net.proxies.close()


async def put_until_ok(net: Net, node: str, key: str, value: bytes, timeout: float = 15) -> None:
    async def ok() -> bool:
        try:
            async with net.client(node, timeout=1.0) as c:
                await c.put(key, value)
            return True
        except errors.StoreError:
            return False

    await eventually(ok, timeout)


@pytest.mark.parametrize("size", [3, 5])
async def test_majority_writes_minority_refuses_fast(
    size: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    net = await start_net(tmp_path, size)
    try:
        leader = await net.leader()
        others = [n for n in net.eps if n != leader]
        # The old leader ends up in the minority: the harder case.
        minority = [leader, *others[: (size - 1) // 2 - 1]] if size == 5 else [leader]
        majority = [n for n in net.eps if n not in minority]
        net.partition(minority, majority)
        new_leader = await net.leader(among=majority)
        assert new_leader in majority
        for i, n in enumerate(majority):
            async with net.client(n) as c:
                await c.put(f"maj/{i}", b"v")  # forwarded to the new leader if needed
        # After about one election timeout the minority knows it has no quorum and
        # refuses at once, with a definite UNAVAILABLE and the reason.
        for n in minority:

            async def refuses_fast(n: str = n) -> bool:
                async with net.client(n, timeout=3.0) as c:
                    t0 = time.monotonic()
                    try:
                        await c.put("min/x", b"v")
                    except errors.Unavailable as e:
                        assert "not applied" in e.message
                        return time.monotonic() - t0 < 0.5
                    except errors.OutcomeUnknown:
                        return False  # in flight when leadership was lost: unknown, fine
                    raise AssertionError(f"minority node {n} accepted a write")

            await eventually(refuses_fast, timeout=5.0)
            async with net.client(n, timeout=3.0) as c:  # so do linearizable reads
                t0 = time.monotonic()
                try:
                    await c.get("maj/0")
                    raise AssertionError(f"minority node {n} served a linearizable read")
                except errors.Unavailable:
                    assert time.monotonic() - t0 < 0.5
            async with net.client(n) as c:  # LOCAL reads still answer, labelled stale
                r = await c.get("maj/0", kv_pb2.CONSISTENCY_LOCAL)
                assert r.header.stale_possible
        # Heal: everyone converges on the majority's history; the minority write never
        # happened.
        net.proxies.heal()
        for n in net.eps:

            async def caught_up(n: str = n) -> bool:
                async with net.client(n) as c:
                    try:
                        r = await c.get(f"maj/{len(majority) - 1}", kv_pb2.CONSISTENCY_LOCAL)
                    except errors.StoreError:
                        return False
                    return r.value == b"v"

            await eventually(caught_up, 15.0)
        async with KVClient(list(net.eps.values()), retries=10) as c:
            assert not (await c.get("min/x")).found
    finally:
        net.cluster.close()
        await net.proxies.close()


async def test_followers_serve_linearizable_reads_of_the_latest_write(net3: Net) -> None:
    leader = await net3.leader()
    followers = [n for n in net3.eps if n != leader]
    async with net3.client(leader) as w:
        for f in followers:
            async with net3.client(f) as r:
                for i in range(20):
                    await w.put("rw", b"%d" % i)
                    got = await r.get("rw")  # linearizable (the default)
                    # Served by the follower itself, never staler than the acked write
                    # (the leader announces commits lazily: a local read would lag).
                    assert got.value == b"%d" % i
                    assert got.header.node_id == f and not got.header.stale_possible
                    assert got.header.forwarded_by == ""


async def test_sigkill_loses_no_acknowledged_write(net5: Net) -> None:
    acked: dict[str, bytes] = {}
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        seq = 0
        async with KVClient(list(net5.eps.values()), timeout=2.0) as c:
            while not stop.is_set():
                seq += 1
                key, value = f"w{w}/{seq}", f"{w}-{seq}".encode()
                try:
                    await c.put(key, value)
                    acked[key] = value
                except errors.StoreError:
                    c._current += 1  # try another node next time
                    await asyncio.sleep(0.02)

    writers = [asyncio.create_task(writer(w)) for w in range(4)]
    try:
        for victim_kind in ("follower", "leader", "follower", "leader"):
            leader = await net5.leader()
            victim = leader if victim_kind == "leader" else next(n for n in net5.eps if n != leader)
            before = len(acked)

            async def progressed(before: int = before) -> bool:
                return len(acked) > before + 20

            await eventually(progressed, 20)
            net5.cluster.nodes[victim].kill()
            # Writes go on without the victim (after a new election if it led).
            down_since = len(acked)

            async def progressed_while_down(before: int = down_since) -> bool:
                return len(acked) > before + 10

            await eventually(progressed_while_down, 20)
            net5.cluster.nodes[victim].start()
            net5.proxies.reset_links_to([victim])
            await net5.cluster.wait_ready(nodes=[victim])
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert len(acked) > 80
    async with KVClient(list(net5.eps.values()), timeout=3.0, retries=20) as c:
        for key, value in acked.items():
            assert (await c.get(key)).value == value, f"acknowledged write {key} lost"


async def test_lagging_follower_catches_up_by_snapshot(net3: Net) -> None:
    leader = await net3.leader()
    lagger = next(n for n in net3.eps if n != leader)
    net3.cluster.nodes[lagger].kill()
    async with net3.client(leader) as c:
        await asyncio.gather(*(c.put(f"k{i}", str(i).encode()) for i in range(400)))
    assert (await net3.status(leader)).first_index > 1  # the leader compacted its log
    net3.cluster.nodes[lagger].start()
    net3.proxies.reset_links_to([lagger])
    await net3.cluster.wait_ready(nodes=[lagger])

    async def same_state() -> bool:
        a, b = await net3.status(leader), await net3.status(lagger)
        return a.state_digest == b.state_digest and b.applied_index >= 400

    await eventually(same_state, 20)
    st = await net3.status(lagger)
    assert st.counters["snapshots_received"] >= 1
    async with net3.client(lagger) as c:
        assert (await c.get("k399", kv_pb2.CONSISTENCY_LOCAL)).value == b"399"


async def test_lone_writes_across_many_compactions_lose_nothing(tmp_path: Path) -> None:
    """One write at a time is fsynced on the event loop while compactions run on the disk
    thread; a save racing a compaction's log rewrite would be lost, or fail."""
    net = await start_net(tmp_path, 3, ["--set", "snapshot_entries=20"])
    try:
        leader = await net.leader()
        # the leader first; the others if leadership moves (a busy machine delays heartbeats)
        order = [net.eps[leader], *(ep for n, ep in net.eps.items() if n != leader)]
        async with KVClient(order, timeout=3.0, retries=20) as c:
            for i in range(300):  # 15 compactions on each node, each write alone
                await c.put(f"k{i}", str(i).encode())
        for n in net.eps:
            st = await net.status(n)
            assert st.counters["fsyncs_inline"] > 0 and st.first_index > 200, (n, st)
        for node in net.cluster.nodes.values():
            node.kill()
        for node in net.cluster.nodes.values():
            node.start()
        net.proxies.reset_links_to(list(net.eps))
        await net.cluster.wait_ready()
        async with KVClient(list(net.eps.values()), timeout=3.0, retries=20) as c:
            for i in range(300):
                assert (await c.get(f"k{i}")).value == str(i).encode(), f"write k{i} lost"
        failures = [
            line
            for log in (tmp_path / "logs").glob("*.log")
            for line in log.read_text().splitlines()
            if "driver_failed" in line
        ]
        assert not failures, failures[0][:500]
    finally:
        net.cluster.close()
        await net.proxies.close()


async def test_graceful_leader_shutdown_transfers_leadership(net3: Net) -> None:
    leader = await net3.leader()
    term = (await net3.status(leader)).term
    rc = await asyncio.to_thread(net3.cluster.nodes[leader].stop)
    assert rc == 0
    others = [n for n in net3.eps if n != leader]
    # TimeoutNow made a follower campaign at once: by the time the old leader exited,
    # a new leader exists, one term later (no election timeout, no extra terms).
    statuses = [await net3.status(n) for n in others]
    leaders = {s.leader_id for s in statuses if s.leader_id}
    assert len(leaders) == 1 and leader not in leaders
    assert {s.term for s in statuses} == {term + 1}
    async with KVClient([net3.eps[n] for n in others]) as c:
        await c.put("after-transfer", b"ok")


async def test_a_node_that_lost_its_disk_recovers_and_its_vote_elects(net3: Net) -> None:
    """README, "A node lost its disk", on real nodes: a follower restarted with an empty
    directory keeps out (``recovering_wait``), probes every peer's term over the wire,
    catches up and drops its ``recovering`` file; then the leader dies, and the two
    left, the recovered node's vote now real, elect a leader that holds every write."""
    import shutil

    leader = await net3.leader()
    async with KVClient(list(net3.eps.values()), timeout=3.0, retries=5) as c:
        for i in range(30):
            await c.put(f"k{i}", b"%d" % i)
    victim = next(n for n in net3.eps if n != leader)
    node = net3.cluster.nodes[victim]
    node.kill()
    shutil.rmtree(node.data_dir)
    node.start()
    net3.proxies.reset_links_to([victim])
    await net3.cluster.wait_ready(nodes=[victim])
    marker = node.data_dir / "recovering"
    await eventually(lambda: not marker.exists(), 20)
    assert "recovering_wait" in node.log_path.read_text(encoding="utf-8")
    net3.cluster.nodes[leader].kill()
    rest = [n for n in net3.eps if n != leader]
    await net3.leader(among=rest, timeout=20)
    async with KVClient([net3.eps[n] for n in rest], timeout=3.0, retries=20) as c:
        for i in range(30):
            assert (await c.get(f"k{i}")).value == b"%d" % i
        await c.put("after", b"1")
