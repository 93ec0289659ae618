"""CLI parsing and exit codes: 0 success, 1 refused/failed (no traceback), 2 usage."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from caplab.cli import main
from caplab.server import NodeServer
from harness.cluster import free_ports


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "caplab.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["kv"],
        ["kv", "--endpoint", "nohostport", "get", "k"],
        ["kv", "--endpoint", "http://127.0.0.1:1", "get", "k"],  # not "outcome unknown"
        ["kv", "--endpoint", "127.0.0.1:1", "frobnicate"],
        ["kv", "--endpoint", "127.0.0.1:1", "incr", "k", "notanumber"],
        ["node", "--store", "raft", "--id", "a", "--listen", "127.0.0.1:1"],
        ["node", "--store", "paxos", "--id", "a", "--listen", "x:1", "--data-dir", "d"],
        [
            "node",
            "--store",
            "raft",
            "--id",
            "a",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            "d",
            "--peer",
            "a=127.0.0.1:2",
        ],
        ["cluster", "--store", "raft", "--nodes", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        sys.exit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert "Traceback" not in err


async def test_kv_roundtrip_and_json(mem_node: NodeServer) -> None:
    ep = f"127.0.0.1:{mem_node.port}"
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "put", "k", "hello")
    assert (rc, out.strip()) == (0, "ok")
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "get", "k")
    assert (rc, out.strip()) == (0, "hello")
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "--json", "incr", "n", "7")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["value"] == 7 and doc["node"] == "m1"
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "cas", "k", "hello", "bye")
    assert (rc, out.strip()) == (0, "swapped")
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "cas", "k", "-", "x", "--absent")
    assert (rc, out.strip()) == (0, "not swapped; current: bye")
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "--json", "status")
    assert rc == 0 and json.loads(out)["status"]["node_id"] == "m1"


async def test_kv_refusal_exits_1_with_one_line(mem_node: NodeServer) -> None:
    ep = f"127.0.0.1:{mem_node.port}"
    rc, out, err = await run_cli("kv", "--endpoint", ep, "put", "", "v")
    assert rc == 1
    assert err.strip().count("\n") == 0 and "INVALID_ARGUMENT" in err
    assert "Traceback" not in err
    rc, out, err = await run_cli("kv", "--endpoint", ep, "--json", "incr", "k", "1")
    assert rc == 0
    rc, out, err = await run_cli("kv", "--endpoint", ep, "--json", "put", "k", "v")
    doc = json.loads(out)
    assert rc == 1 and doc == {
        "ok": False,
        "op": "put",
        "code": "FAILED_PRECONDITION",
        "definite": True,
        "error": doc["error"],
    }
    assert "counter" in doc["error"]


async def test_kv_unreachable_exits_1() -> None:
    port = free_ports(1)[0]
    rc, _, err = await run_cli(
        "kv", "--endpoint", f"127.0.0.1:{port}", "--retries", "0", "get", "k"
    )
    assert rc == 1 and "refused" in err and "Traceback" not in err


def test_the_endpoint_may_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CAPLAB_ENDPOINT", raising=False)
    assert main(["kv", "get", "k"]) == 2
    assert "CAPLAB_ENDPOINT" in capsys.readouterr().err
    monkeypatch.setenv("CAPLAB_ENDPOINT", "http://127.0.0.1:1")
    assert main(["kv", "get", "k"]) == 2
    assert "no scheme" in capsys.readouterr().err
