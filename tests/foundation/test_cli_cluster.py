"""`caplab cluster` without a terminal: N nodes in the foreground that outlive the death of
one of them, all gone after SIGTERM."""

from __future__ import annotations

import asyncio
import os
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


def processes_mentioning(*needles: bytes) -> list[int]:
    """Pids of live processes whose command line contains every needle."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if all(n in cmdline for n in needles):
                pids.append(int(entry.name))
    return pids


async def test_cluster_survives_a_dead_node_then_leaves_no_process(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "caplab.cli", "cluster", "--store", "raft", "--nodes", "3",
        "--data-dir", str(tmp_path),
        stdin=asyncio.subprocess.DEVNULL,  # no terminal: no console
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    ports: list[int] = []
    deadline = time.monotonic() + 60
    while len(ports) < 3:
        line = (
            await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        ).decode()
        assert line, "caplab cluster exited before printing its endpoints"
        assert "caplab>" not in line
        if m := re.match(r"\s+n\d+\s+127\.0\.0\.1:(\d+)", line):
            ports.append(int(m.group(1)))
    endpoints = [f"127.0.0.1:{p}" for p in ports]
    async with KVClient(endpoints, retries=20, timeout=2) as c:
        await c.put("k", b"v")
        assert (await c.get("k")).value == b"v"

    # a node dies: said once, with its log; the others keep serving
    [n3] = processes_mentioning(str(tmp_path).encode(), b"--id\0n3\0")
    os.kill(n3, signal.SIGKILL)
    said = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
    assert said.startswith("node n3 exited with code -9; see ")
    assert str(tmp_path / "logs" / "n3.log") in said
    async with KVClient(endpoints[:2], retries=40, timeout=2) as c:
        await c.put("k", b"w")
        assert (await c.get("k")).value == b"w"
    assert proc.returncode is None, "caplab cluster stopped when a node died"

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not any(port_open(p) for p in ports), "a node outlived `caplab cluster`"
    assert processes_mentioning(str(tmp_path).encode()) == []
    assert await proc.stderr.read() == b"", "the death was reported more than once"
