"""`caplab cluster`: N nodes in the foreground, all gone after SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from caplab.client import KVClient

pytestmark = pytest.mark.integration


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_cluster_serves_then_leaves_no_process(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "caplab.cli", "cluster", "--store", "raft", "--nodes", "3",
        "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    ports: list[int] = []
    deadline = time.monotonic() + 60
    while len(ports) < 3:
        line = (
            await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        ).decode()
        assert line, "caplab cluster exited before printing its endpoints"
        if m := re.match(r"\s+n\d+\s+127\.0\.0\.1:(\d+)", line):
            ports.append(int(m.group(1)))
    async with KVClient([f"127.0.0.1:{p}" for p in ports], retries=20, timeout=2) as c:
        await c.put("k", b"v")
        assert (await c.get("k")).value == b"v"
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not any(port_open(p) for p in ports), "a node outlived `caplab cluster`"
