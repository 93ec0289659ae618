"""The gossip store at the edges of its contract, end to end (real processes, gRPC, proxies).

Counters at the ends of int64, 1 MiB values and multi-MiB backlogs, clock skew from
seconds to a day (issue 13). Each test failed on the code before that issue.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from caplab.v1 import kv_pb2
from tests.gossip.test_integration import NODES, Net, running_net
from tests.polling import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.harness_loop,  # (its proxies)
]

MAX = 2**63 - 1
MIN = -(2**63)
MIB = 1 << 20


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    async with running_net(tmp_path_factory.mktemp("gossip-edges")) as n:
        yield n


@pytest_asyncio.fixture(loop_scope="module")
async def healed(net: Net) -> AsyncIterator[Net]:
    net.proxies.heal()
    yield net
    net.proxies.heal()
    for c in net.clients.values():
        await c.set_clock_skew(0)


async def _everyone(net: Net, key: str, value: bytes | int | None) -> bool:
    for c in net.clients.values():
        r = await c.get(key)
        if (r.value if r.found else None) != value:
            return False
    return True


async def test_increments_at_the_ends_of_int64_never_wedge_a_node(healed: Net) -> None:
    """+MAX, -MAX, +MAX, -MAX, +MAX: each legal, but the node's increment total passes
    2**64; the codec raised in the flusher and the node stopped taking writes for good."""
    net = healed
    c1 = net.clients["n1"]
    for d in (MAX, -MAX, MAX, -MAX, MAX):
        await c1.increment("edge/ctr", d)
    await c1.put("edge/after", b"still writable")
    await eventually(lambda: _everyone(net, "edge/ctr", MAX), 20.0)
    await eventually(lambda: _everyone(net, "edge/after", b"still writable"), 20.0)
    entry = next(e for e in await c1.dump() if e.key == "edge/ctr")
    assert entry.counter_exact == str(MAX)
    assert sorted(int(v) for v in entry.counter_increments_exact.values()) == [3 * MAX]
    # and it survives a restart
    node = net.cluster.nodes["n1"]
    node.kill()
    node.start()
    await net.cluster.wait_ready(nodes=["n1"])
    net.proxies.reset_links_to(["n1"])
    assert (await c1.get("edge/ctr")).value == MAX
    await c1.increment("edge/ctr", -1)
    await eventually(lambda: _everyone(net, "edge/ctr", MAX - 1), 20.0)


async def test_a_merged_counter_beyond_int64_reads_saturated_never_internal(
    healed: Net,
) -> None:
    net = healed
    c1, c2 = net.clients["n1"], net.clients["n2"]
    net.partition(["n1"], ["n2", "n3"])
    await c1.increment("edge/over", MAX)
    await c2.increment("edge/over", MAX)
    await c1.increment("edge/under", MIN)
    await c2.increment("edge/under", MIN)
    net.proxies.heal()
    await eventually(net.converged, 20.0)
    for c in net.clients.values():
        assert (await c.get("edge/over")).value == MAX  # saturated
        assert (await c.get("edge/under")).value == MIN
    entries = {e.key: e for e in await c2.dump()}
    assert entries["edge/over"].counter_exact == str(2 * MAX)
    assert entries["edge/over"].counter == MAX
    assert entries["edge/under"].counter_exact == str(2 * MIN)
    # the exact value decides what an increment may do
    with pytest.raises(Exception, match=r"OUT_OF_RANGE|overflow"):
        await c1.increment("edge/over", 1)
    assert (await c1.increment("edge/over", -MAX)).value == MAX


async def test_megabyte_values_and_backlogs_replicate(healed: Net) -> None:
    """Peer batches were sized by entry count and the receiver refused any batch over
    2 MiB + 64 KiB: four concurrent 1 MiB puts never reached the other replicas."""
    net = healed
    c1 = net.clients["n1"]
    values = {f"edge/big{i}": bytes([i]) * MIB for i in range(4)}
    await asyncio.gather(*(c1.put(k, v) for k, v in values.items()))
    await c1.put("edge/small-after", b"x")
    for k, v in values.items():
        await eventually(lambda k=k, v=v: _everyone(net, k, v), 30.0)  # type: ignore[misc]
    await eventually(lambda: _everyone(net, "edge/small-after", b"x"), 20.0)
    # a replica that was down catches up with a multi-MiB backlog
    node = net.cluster.nodes["n3"]
    node.kill()
    later = {f"edge/late{i}": bytes([100 + i]) * MIB for i in range(5)}
    for k, v in later.items():
        await c1.put(k, v)
    node.start()
    await net.cluster.wait_ready(nodes=["n3"])
    net.proxies.reset_links_to(["n3"])
    c3 = net.clients["n3"]
    for k, v in later.items():

        async def has(k: str = k, v: bytes = v) -> bool:
            return (await c3.get(k)).value == v

        await eventually(has, 30.0)
    await eventually(net.converged, 30.0)


@pytest.mark.parametrize("skew_ms", [5_000, 120_000, 3_600_000, 86_400_000])
async def test_writes_after_a_far_future_value_win_on_the_node_that_took_them(
    healed: Net, skew_ms: int
) -> None:
    """With n1's clock ahead by more than max_drift_ms (60 s), its values were merged
    while the HLC refused to follow them: later writes on n2 got lower timestamps and
    lost to them on n2 itself, silently."""
    net = healed
    c1, c2 = net.clients["n1"], net.clients["n2"]
    key, gone = f"edge/skew{skew_ms}", f"edge/skew{skew_ms}-gone"
    await c1.set_clock_skew(skew_ms)
    await c1.put(key, b"from the future")
    await c1.put(gone, b"doomed")
    await eventually(lambda: _everyone(net, key, b"from the future"), 20.0)
    await eventually(lambda: _everyone(net, gone, b"doomed"), 20.0)
    await c2.put(key, b"now")
    await c2.delete(gone)
    # read-your-writes on the node that acknowledged them
    assert (await c2.get(key)).value == b"now"
    assert not (await c2.get(gone)).found
    await c1.set_clock_skew(0)
    await eventually(lambda: _everyone(net, key, b"now"), 20.0)
    await eventually(lambda: _everyone(net, gone, None), 20.0)
    st = await c2.status()
    if skew_ms > 60_000:
        # followed, and counted: a clock is wrong somewhere
        assert st.counters["clock_jumps"] > 0
        assert st.counters["max_clock_jump_ms"] >= skew_ms - 60_000


async def test_a_request_applied_on_two_nodes_counts_once(healed: Net) -> None:
    """The client library moves to the next endpoint after UNAVAILABLE (e.g. the node
    died after making the increment durable, before answering). The second node, which
    had not heard of it, applied it again: +10 twice gave 20 (issue 13)."""
    net = healed
    c1, c2, c3 = (net.clients[n] for n in NODES)
    rid = kv_pb2.RequestId(client_id="edge-twice", sequence=1)
    req = kv_pb2.IncrementRequest(key="edge/once", delta=10, request_id=rid)
    net.partition(["n1"], ["n2", "n3"])  # n2 cannot have heard of n1's application
    first = await c1.kv().Increment(req, timeout=3.0)
    second = await c2.kv().Increment(req, timeout=3.0)
    assert first.value == second.value == 10
    net.proxies.heal()
    await eventually(net.converged, 20.0)
    await eventually(lambda: _everyone(net, "edge/once", 10), 20.0)
    # a third retry, anywhere, is answered from the merged record: not applied again
    third = await c3.kv().Increment(req, timeout=3.0)
    assert third.value == 10
    assert (await c3.get("edge/once")).value == 10
    merged = [(await c.status()).counters["duplicates_merged"] for c in (c1, c2, c3)]
    assert sum(merged) >= 1
    # the same id for another operation is refused, on any node
    with pytest.raises(Exception, match="already used"):
        await c3.kv().Put(kv_pb2.PutRequest(key="edge/x", value=b"v", request_id=rid))
    # ... and for the same operation on another key (it answered with the first key's value)
    with pytest.raises(Exception, match="already used for an increment of key 'edge/once'"):
        await c3.kv().Increment(
            kv_pb2.IncrementRequest(key="edge/other", delta=1, request_id=rid), timeout=3.0
        )
    assert (await c3.get("edge/other", kv_pb2.CONSISTENCY_LOCAL)).found is False


async def test_a_request_id_reused_with_another_payload_is_refused_on_any_node(
    healed: Net,
) -> None:
    """The reviewer's repro: incr k delta=1 rid R -> 1; incr k delta=100 rid R -> 1;
    put k 'first' rid R2 -> ok; put k 'second' rid R2 -> ok but never written. Now the
    second of each pair is refused (FAILED_PRECONDITION) on the node that applied the
    first and on the others (the digest travels with the replicated record)."""
    net = healed
    c1, c2, c3 = (net.clients[n] for n in NODES)
    r1 = kv_pb2.RequestId(client_id="edge-payload", sequence=1)
    r2 = kv_pb2.RequestId(client_id="edge-payload", sequence=2)
    inc = kv_pb2.IncrementRequest(key="edge/payload-n", delta=1, request_id=r1)
    assert (await c1.kv().Increment(inc, timeout=3.0)).value == 1
    put = kv_pb2.PutRequest(key="edge/payload-k", value=b"first", request_id=r2)
    await c1.kv().Put(put, timeout=3.0)
    await eventually(lambda: _everyone(net, "edge/payload-k", b"first"), 20.0)
    await eventually(net.converged, 20.0)
    for c in (c1, c2, c3):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.kv().Increment(
                kv_pb2.IncrementRequest(key="edge/payload-n", delta=100, request_id=r1),
                timeout=3.0,
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "request sequence 1 of client 'edge-payload' was already used for an increment "
            "of key 'edge/payload-n' with another delta; not applied"
        ) in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.kv().Put(
                kv_pb2.PutRequest(key="edge/payload-k", value=b"second", request_id=r2),
                timeout=3.0,
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "for a put of key 'edge/payload-k' with another value; not applied" in (
            info.value.details() or ""
        )
        assert (await c.kv().Increment(inc, timeout=3.0)).value == 1  # a true retry
    await eventually(net.converged, 20.0)
    assert await _everyone(net, "edge/payload-k", b"first")
    assert await _everyone(net, "edge/payload-n", 1)


async def test_a_wiped_node_keeps_the_increments_it_takes_after_its_restart(healed: Net) -> None:
    """A node restarted on an empty data directory counted again from 0 in its old
    counter component, which the others held higher: the join discarded its new
    increments (the counter stayed at 5 instead of 7, issue 13)."""
    net = healed
    c1 = net.clients["n1"]
    await c1.increment("edge/wiped", 5)
    await eventually(lambda: _everyone(net, "edge/wiped", 5), 20.0)
    node = net.cluster.nodes["n1"]
    node.kill()
    shutil.rmtree(node.data_dir)
    node.start()
    await net.cluster.wait_ready(nodes=["n1"])
    net.proxies.reset_links_to(["n1"])
    await c1.increment("edge/wiped", 1)
    await c1.increment("edge/wiped", 1)
    await eventually(lambda: _everyone(net, "edge/wiped", 7), 20.0)
    await eventually(net.converged, 20.0)
