from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from caplab.clock import SkewableClock
from caplab.server import NodeServer
from caplab.store import NodeConfig
from harness.cluster import free_ports
from tests.foundation.memstore import MemBackend


async def start_mem_node(
    tmp_path: Path,
    enable_admin: bool = False,
    backend: type[MemBackend] = MemBackend,
    grace_s: float = 1.0,
) -> NodeServer:
    """A node of the shared runtime over a dictionary backend (``backend``: MemBackend or
    a subclass of it), listening on a free port of 127.0.0.1."""
    port = free_ports(1)[0]
    config = NodeConfig(
        store="mem",
        node_id="m1",
        listen=f"127.0.0.1:{port}",
        peers={},
        data_dir=str(tmp_path),
        enable_admin=enable_admin,
    )
    node = NodeServer(config, backend(config, SkewableClock()), grace_s=grace_s)
    await node.start()
    return node


@pytest.fixture
async def mem_node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    node = await start_mem_node(tmp_path, enable_admin=False)
    yield node
    await node.stop()


@pytest.fixture
async def admin_node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    node = await start_mem_node(tmp_path, enable_admin=True)
    yield node
    await node.stop()
