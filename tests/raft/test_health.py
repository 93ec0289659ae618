"""gRPC health of a raft node follows whether it can serve linearizable requests
(issue 15): NOT_SERVING without a quorum, SERVING again once it has one; for the whole
server ("") and for each service it serves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.polling import eventually
from tests.raft.test_integration import Net, start_net

pytestmark = pytest.mark.harness_loop  # (its proxies)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ["", "caplab.v1.KV", "caplab.v1.Cluster"]


@pytest.fixture
async def net3(tmp_path: Path) -> AsyncIterator[Net]:
    net = await start_net(tmp_path, 3)
    yield net
    net.cluster.close()
    await net.proxies.close()


async def statuses(address: str) -> dict[str, int]:
    """Health of every service name (absent: an exception, the test fails)."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        out = {}
        for s in SERVICES:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=2)
            out[s] = r.status
        return out


@pytest.mark.integration
async def test_health_is_not_serving_without_quorum_and_serving_again_with_it(
    net3: Net,
) -> None:
    # Every service name answers (caplab.v1.KV was NOT_FOUND). The nodes are up before
    # they elect a leader and NOT_SERVING until then (wait_ready does not wait for that).
    async def all_serving() -> bool:
        for n in net3.eps:
            if await statuses(net3.eps[n]) != dict.fromkeys(SERVICES, SERVING):
                return False
        return True

    await eventually(all_serving, 15)
    leader = await net3.leader()
    survivor = leader  # the hardest case: a leader keeps believing in itself
    others = [n for n in net3.eps if n != survivor]
    async with grpc.aio.insecure_channel(net3.eps[survivor]) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="caplab.v1.KV")
        )
        seen = [(await watch.read()).status]
        for n in others:
            net3.cluster.nodes[n].kill()

        async def not_serving() -> bool:
            return (await statuses(net3.eps[survivor])) == {
                "": NOT_SERVING,
                "caplab.v1.KV": NOT_SERVING,
                "caplab.v1.Cluster": SERVING,  # Status answers without a quorum
            }

        await eventually(not_serving, 10)
        net3.cluster.nodes[others[0]].start()
        net3.proxies.reset_links_to([others[0]])

        async def serving() -> bool:
            return (await statuses(net3.eps[survivor])) == dict.fromkeys(SERVICES, SERVING)

        await eventually(serving, 20)
        while seen[-1] != SERVING or NOT_SERVING not in seen:
            r = await asyncio.wait_for(watch.read(), 10)
            assert isinstance(r, health_pb2.HealthCheckResponse)
            seen.append(r.status)
        watch.cancel()
    assert seen[0] == SERVING and NOT_SERVING in seen  # Watch saw both transitions


@pytest.mark.integration
async def test_a_node_restarted_without_a_majority_is_ready_but_not_serving(net3: Net) -> None:
    """``LocalCluster.wait_ready`` waited for SERVING: a raft node restarted while most of
    the cluster is down (the console's ``restart``) timed out although it was up."""
    for node in net3.cluster.nodes.values():
        node.kill()
    lone = next(iter(net3.eps))
    net3.cluster.nodes[lone].start()
    await net3.cluster.wait_ready(timeout=15.0, nodes=[lone])
    assert (await statuses(net3.eps[lone]))["caplab.v1.KV"] == NOT_SERVING
    with pytest.raises(TimeoutError):
        await net3.cluster.wait_ready(timeout=1.0, nodes=[lone], serving=True)
