"""harness.etcd drives a real 3-member etcd cluster over our subset of etcd's gRPC API
(skipped where the `etcd` binary is not installed)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from harness.etcd.cluster import (
    INSTALL_HINT,
    EtcdCluster,
    etcd_binary,
    etcd_put,
    etcd_range,
    kv_stub,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(etcd_binary() is None, reason=INSTALL_HINT),
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_put_then_linearizable_range_on_every_member(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path) as cluster:
        pids = cluster.pids
        assert len(pids) == 3
        await cluster.wait_ready(timeout=20)
        leader = await cluster.leader_endpoint()
        assert leader in cluster.endpoints
        async with grpc.aio.insecure_channel(leader) as channel:
            revision = await etcd_put(kv_stub(channel), b"k", b"v1", timeout=5)
            assert revision > 1
        # a linearizable read through any member (a follower asks the leader for its read
        # index) sees the acknowledged put
        for endpoint in cluster.endpoints:
            async with grpc.aio.insecure_channel(endpoint) as channel:
                stub = kv_stub(channel)
                assert await etcd_range(stub, b"k", timeout=5) == b"v1"
                assert await etcd_range(stub, b"absent", timeout=5) is None
    # stop() waited for every member
    assert not [pid for pid in pids if _alive(pid)]
    for member in cluster.members:
        assert member.log_path.exists()
