"""CLI parsing and exit codes: 0 success, 1 refused/failed (no traceback), 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from caplab import errors, kvcli
from caplab.cli import build_parser, main
from caplab.client import KVClient
from caplab.server import NodeServer
from caplab.v1 import kv_pb2
from caplab.validation import MAX_VALUE_BYTES
from harness.cluster import free_ports


async def run_cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "caplab.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["kv"],
        ["kv", "--endpoint", "nohostport", "get", "k"],
        ["kv", "--endpoint", "http://127.0.0.1:1", "get", "k"],  # not "outcome unknown"
        ["kv", "get", "k", "--endpoint", "grpc://127.0.0.1:1"],  # after OP too
        ["kv", "--endpoint", "127.0.0.1:1/kv", "get", "k"],
        ["kv", "--endpoint", "127.0.0.1:1", "put", "k"],  # no value
        ["kv", "--endpoint", "127.0.0.1:1", "put", "k", "v", "--file", "/dev/null"],
        ["kv", "--endpoint", "127.0.0.1:1", "put", "k", "--file", "/nonexistent/value"],
        ["kv", "--endpoint", "127.0.0.1:1", "get", "k", "--local", "--linearizable"],
        ["kv", "--endpoint", "127.0.0.1:1", "get", "k", "--local", "--consistency", "session"],
        ["kv", "--endpoint", "127.0.0.1:1", "get", "k", "--consistency", "psychic"],
        ["kv", "--endpoint", "127.0.0.1:1", "get", "k", "--max-staleness-ms", "-1"],
        ["kv", "--endpoint", "127.0.0.1:1", "--session-token", "zz", "get", "k"],
        ["kv", "--endpoint", "127.0.0.1:1", "get", "k", "--timeout", "0"],
        ["kv", "--endpoint", "127.0.0.1:1", "get", "\udcff"],  # argv bytes that are not UTF-8
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
    """Nothing listening: UNAVAILABLE, definitely not applied (kv.proto's error table),
    for a write too."""
    port = free_ports(1)[0]
    rc, _, err = await run_cli(
        "kv", "--endpoint", f"127.0.0.1:{port}", "--retries", "0", "put", "k", "v"
    )
    assert rc == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("caplab: not applied (UNAVAILABLE): could not connect to 127.0.0.1:")
    assert "Connection refused" in err
    rc, out, _ = await run_cli("kv", "put", "k", "v", "--endpoint", f"127.0.0.1:{port}", "--json")
    doc = json.loads(out)
    assert rc == 1 and (doc["code"], doc["definite"]) == ("UNAVAILABLE", True)


def test_a_name_that_does_not_resolve_is_not_applied() -> None:
    """grpc 1.85 reports it as "errors resolving ...": the request never left (it was
    classified "outcome unknown")."""
    details = (
        "errors resolving nosuchhost.invalid:1: [field:hostname lookup error:address lookup "
        "failed for nosuchhost.invalid:1: Domain name not found]"
    )
    err = errors.classify(grpc.StatusCode.UNAVAILABLE, details, ())
    assert isinstance(err, errors.TransportError) and err.definite
    assert kvcli.failure_line(err, "put", ["nosuchhost.invalid:1"]).startswith(
        "not applied (UNAVAILABLE): could not connect to nosuchhost.invalid:1"
    )
    reset = errors.classify(grpc.StatusCode.UNAVAILABLE, "Socket closed", ())
    assert not reset.definite
    assert "outcome unknown" in kvcli.failure_line(reset, "put", ["h:1"])


def _kv_args(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv).parse_args(argv)


def test_the_endpoint_may_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CAPLAB_ENDPOINTS", raising=False)
    monkeypatch.delenv("CAPLAB_ENDPOINT", raising=False)
    args = _kv_args(["kv", "get", "k"])
    assert kvcli.endpoints(args) == ["127.0.0.1:7001"] == [kvcli.DEFAULT_ENDPOINT]
    monkeypatch.setenv("CAPLAB_ENDPOINT", "127.0.0.1:7201")  # the older name: an alias
    assert kvcli.endpoints(args) == ["127.0.0.1:7201"]
    monkeypatch.setenv("CAPLAB_ENDPOINTS", "127.0.0.1:7101, 127.0.0.1:7102,")
    assert kvcli.endpoints(args) == ["127.0.0.1:7101", "127.0.0.1:7102"]
    args = _kv_args(["kv", "--endpoint", "h:1", "get", "k", "--endpoint", "h:2"])
    assert kvcli.endpoints(args) == ["h:1", "h:2"]  # flags win, before and after OP
    monkeypatch.setenv("CAPLAB_ENDPOINTS", "http://127.0.0.1:1")
    assert main(["kv", "get", "k"]) == 2
    err = capsys.readouterr().err
    assert "CAPLAB_ENDPOINTS" in err and "without http://" in err
    monkeypatch.delenv("CAPLAB_ENDPOINTS")
    monkeypatch.setenv("CAPLAB_ENDPOINT", "127.0.0.1:1/x")
    assert main(["kv", "get", "k"]) == 2
    assert "without a path" in capsys.readouterr().err


# every kind of common flag: repeated, boolean, float, int, and string (file) flags
FLAG_KINDS: list[tuple[list[str], dict[str, object]]] = [
    (["--endpoint", "h:1", "--endpoint", "h:2"], {"endpoint": ["h:1", "h:2"]}),
    (["--json"], {"json": True}),
    (["--timeout", "1.5"], {"timeout": 1.5}),
    (["--retries", "0"], {"retries": 0}),
    (
        ["--ca", "ca.crt", "--cert", "c.crt", "--key", "c.key", "--token-file", "t"],
        {"ca": "ca.crt", "cert_file": "c.crt", "key_file": "c.key", "token_file": "t"},
    ),
]


@pytest.mark.parametrize(("flags", "expected"), FLAG_KINDS)
@pytest.mark.parametrize("op", [["put", "k", "v"], ["get", "k"], ["incr", "k"], ["status"]])
def test_common_flags_go_before_or_after_the_operation(
    flags: list[str], expected: dict[str, object], op: list[str]
) -> None:
    defaults = {"endpoint": ["127.0.0.1:7001"], "json": False, "timeout": 5.0, "retries": 2}
    defaults |= {"ca": None, "cert_file": None, "key_file": None, "token_file": None}
    for argv in (["kv", *flags, *op], ["kv", *op, *flags]):
        args = _kv_args(argv)
        args.endpoint = kvcli.endpoints(args)
        got = {k: getattr(args, k) for k in defaults}
        assert got == defaults | expected, argv
        assert args.op == op[0]
    # a flag before OP is not reset by OP's parser; both places: the later one wins
    args = _kv_args(["kv", "--timeout", "2", "--json", "get", "k", "--timeout", "3"])
    assert (args.timeout, args.json) == (3.0, True)


async def test_flags_after_the_operation_against_a_node(mem_node: NodeServer) -> None:
    ep = f"127.0.0.1:{mem_node.port}"
    rc, out, _ = await run_cli("kv", "put", "k", "v", "--json", "--endpoint", ep)
    assert rc == 0 and json.loads(out)["ok"] is True
    rc, out, _ = await run_cli("kv", "--json", "get", "k", "--endpoint", ep, "--retries", "0")
    doc = json.loads(out)
    assert rc == 0 and (doc["found"], doc["value"]) == (True, "v")


async def test_a_1_mib_value_from_stdin_or_a_file(mem_node: NodeServer, tmp_path: Path) -> None:
    ep = f"127.0.0.1:{mem_node.port}"
    blob = bytes(range(256)) * (MAX_VALUE_BYTES // 256)  # 1 MiB, not UTF-8
    assert len(blob) == MAX_VALUE_BYTES
    rc, out, err = await run_cli("kv", "--endpoint", ep, "put", "blob", "-", stdin=blob)
    assert (rc, out.strip()) == (0, "ok"), err
    path = tmp_path / "value"
    path.write_bytes(blob[::-1])
    rc, out, err = await run_cli("kv", "put", "file", "--file", str(path), "--endpoint", ep)
    assert (rc, out.strip()) == (0, "ok"), err
    async with KVClient([ep]) as c:
        assert (await c.get("blob")).value == blob
        assert (await c.get("file")).value == blob[::-1]
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "get", "blob")
    assert rc == 0 and out.strip() == "0x" + blob.hex()
    # one byte more: a usage error, nothing sent
    rc, _, err = await run_cli("kv", "--endpoint", ep, "put", "big", "-", stdin=blob + b"x")
    assert rc == 2 and "1 MiB" in err and "nothing was sent" in err
    async with KVClient([ep]) as c:
        assert not (await c.get("big")).found


class _EndlessZeros(io.RawIOBase):
    """Standard input that never ends (`head -c 300M /dev/zero |`), counting what is read;
    fails the test once far more than a value was read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(buf)
        self.read_bytes += n
        assert self.read_bytes <= 4 * MAX_VALUE_BYTES, "standard input read without a limit"
        buf[:n] = bytes(n)
        return n


def test_a_value_over_the_limit_is_refused_without_reading_it_all(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`head -c 300M /dev/zero | caplab kv put k -` read all of it (1.27 GB) before the
    node refused it: now at most 1 MiB + 1 byte is read, and a larger file is refused from
    its size, before reading it."""
    raw = _EndlessZeros()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(raw)))
    assert main(["kv", "--endpoint", "127.0.0.1:1", "put", "k", "-"]) == 2
    assert raw.read_bytes <= MAX_VALUE_BYTES + 1 + io.DEFAULT_BUFFER_SIZE
    err = capsys.readouterr().err
    assert f"more than {MAX_VALUE_BYTES} bytes" in err and "1 MiB" in err
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: a size without the bytes
    assert main(["kv", "--endpoint", "127.0.0.1:1", "put", "k", "--file", str(big)]) == 2
    err = capsys.readouterr().err
    assert f"--file: the value is {1 << 30} bytes; the limit is {MAX_VALUE_BYTES}" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["put", "k3", "--json", "--", "-5"], {"key": "k3", "value": "-5", "json": True}),
        (["put", "k4", "--", "-5"], {"key": "k4", "value": "-5", "json": False}),
        (["--json", "put", "k4", "--", "-6"], {"key": "k4", "value": "-6", "json": True}),
        (["put", "--", "k", "-x"], {"key": "k", "value": "-x"}),
        (["put", "k", "--json", "--timeout", "3", "--", "--json"], {"value": "--json"}),
        (["put", "k", "--", "--"], {"value": "--"}),
        (["put", "k", "--json", "v"], {"value": "v", "json": True}),  # a flag between
        (["cas", "k", "--json", "--", "-a", "-b"], {"expected": "-a", "new": "-b"}),
        (["incr", "k", "--json", "--", "-5"], {"delta": -5, "json": True}),
        (["incr", "k", "--json"], {"delta": 1}),
    ],
)
def test_values_starting_with_a_dash_after_double_dash(
    argv: list[str], expected: dict[str, object]
) -> None:
    """`put k3 --json -- -5` was "unrecognized arguments: -- -5": argparse filled the
    optional VALUE with nothing before --json."""
    args = _kv_args(["kv", *argv])
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["put", "k", "-x"],
        ["put", "k", "--", "-x", "--json"],  # after --, --json is a (second) value
        ["cas", "k", "-a", "--", "-b"],
        ["incr", "k", "--", "x"],
        ["get"],
        ["get", "k", "--timeout", "x"],
    ],
)
def test_a_usage_error_of_an_operation_shows_its_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["kv", "--endpoint", "127.0.0.1:1", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: caplab kv {argv[0]} ")
    assert f"\ncaplab kv {argv[0]}: error: " in err
    assert "key" in err.split("error:")[0]  # the operands are in the usage


async def test_a_dash_value_after_a_flag_against_a_node(mem_node: NodeServer) -> None:
    ep = f"127.0.0.1:{mem_node.port}"
    rc, out, err = await run_cli("kv", "put", "k3", "--json", "--endpoint", ep, "--", "-5")
    assert rc == 0 and json.loads(out)["ok"] is True, err
    rc, out, _ = await run_cli("kv", "get", "k3", "--endpoint", ep)
    assert (rc, out) == (0, "-5\n")


async def test_get_json_says_how_the_value_is_encoded(mem_node: NodeServer) -> None:
    """The text "0x6869" and the bytes b"hi" both came out as "value": "0x6869"."""
    ep = f"127.0.0.1:{mem_node.port}"
    async with KVClient([ep]) as c:
        await c.put("text", b"0x6869")
        await c.put("bytes", b"\xffhi")
        await c.increment("n", 3)

    async def get(key: str, *more: str) -> dict[str, object]:
        rc, out, _ = await run_cli("kv", "--endpoint", ep, "--json", "get", key, *more)
        assert rc == 0
        doc: dict[str, object] = json.loads(out)
        return {k: v for k, v in doc.items() if k in ("found", "type", "encoding") or "val" in k}

    assert await get("text") == {
        "found": True,
        "type": "register",
        "value": "0x6869",
        "encoding": "utf-8",
    }
    assert await get("bytes") == {
        "found": True,
        "type": "register",
        "value_hex": "ff6869",
        "encoding": "hex",
    }
    assert await get("n") == {"found": True, "type": "counter", "value": 3}
    assert await get("absent", "--local") == {"found": False, "value": None}
    rc, out, _ = await run_cli("kv", "--endpoint", ep, "--json", "cas", "bytes", "x", "y")
    doc = json.loads(out)
    assert rc == 0 and doc["swapped"] is False
    assert (doc["current_hex"], doc["current_encoding"]) == ("ff6869", "hex")
    assert "current" not in doc


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise AssertionError(f"no subcommand {name}")


def test_help_describes_every_flag_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["kv"], *(["kv", op] for op in kvcli.OPS_HELP)):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        sub = build_parser(argv)
        for name in argv:
            sub = _subparser(sub, name)
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (argv, flag)
            if action.option_strings and action.help is not argparse.SUPPRESS:
                assert action.help, (argv, action.option_strings)
        assert "exit codes:" in text, argv
        for code in ("0 ", "1 ", "2 ", "130"):
            assert f"\n  {code}" in text, (argv, code)
        for words in ("not applied", "outcome unknown", "usage error", "absent"):
            assert words in text, (argv, words)
    with pytest.raises(SystemExit):
        main(["kv", "--help"])
    text = capsys.readouterr().out
    for words in ("CAPLAB_ENDPOINTS", "127.0.0.1:7001", "put KEY -", "--file PATH"):
        assert words in text


def test_status_is_a_readable_table() -> None:
    raft = kv_pb2.StatusResponse(
        node_id="n1",
        store=kv_pb2.STORE_KIND_RAFT,
        address="127.0.0.1:7001",
        role="leader",
        term=7,
        leader_id="n1",
        leader_address="127.0.0.1:7001",
        commit_index=42,
        applied_index=41,
        first_index=3,
        keys=5,
        clock_skew_ms=-250,
        version="9.9.9",
        members=[
            kv_pb2.Member(
                node_id="n3",
                address="127.0.0.1:7003",
                state=kv_pb2.MEMBER_STATE_ALIVE,
                match_index=40,
            ),
            kv_pb2.Member(
                node_id="n2",
                address="127.0.0.1:7002",
                state=kv_pb2.MEMBER_STATE_DEAD,
                match_index=12,
            ),
        ],
        counters={"elections_started": 2, "snapshots_sent": 0},
    )
    lines = kvcli.status_table(raft).splitlines()
    fields = {line[:13].strip(): line[14:] for line in lines if not line.startswith(" ")}
    assert fields["node"] == "n1" and fields["store"] == "raft" and fields["role"] == "leader"
    assert fields["term"] == "7" and fields["leader"] == "n1 (this node)"
    assert (fields["commit"], fields["applied"]) == ("42", "41")
    assert fields["clock skew"] == "-250 ms" and fields["version"] == "9.9.9"
    assert fields["members"] == "2 besides this node" and "hlc" not in fields
    members = [line.split() for line in lines if line.startswith("  ")]
    assert members[:3] == [
        ["NODE", "PEER", "ADDRESS", "STATE", "MATCH", "INDEX"],
        ["n2", "127.0.0.1:7002", "dead", "12"],
        ["n3", "127.0.0.1:7003", "alive", "40"],
    ]
    assert members[3:] == [["elections_started", "2"]]  # zero counters left out

    gossip = kv_pb2.StatusResponse(
        node_id="g1",
        store=kv_pb2.STORE_KIND_GOSSIP,
        role="replica",
        hlc=kv_pb2.HlcTimestamp(wall_ms=1700000000000, logical=3, node_id="g1"),
        members=[kv_pb2.Member(node_id="g2", state=kv_pb2.MEMBER_STATE_SUSPECT, incarnation=4)],
    )
    text = kvcli.status_table(gossip)
    assert "hlc           1700000000000.3@g1" in text and "term" not in text
    assert text.splitlines()[-1].split() == ["g2", "-", "suspect", "4", "never"]


def test_status_does_not_present_a_peer_address_as_the_leaders() -> None:
    """A follower knows its leader by the --peer address, the leader's peer listener
    (members only, mutual TLS): "leader n3 at 127.0.0.1:17106" sent clients there."""
    follower = kv_pb2.StatusResponse(
        node_id="n1",
        store=kv_pb2.STORE_KIND_RAFT,
        address="127.0.0.1:7001",
        role="follower",
        leader_id="n3",
        leader_address="127.0.0.1:17106",
    )
    lines = kvcli.status_table(follower).splitlines()
    assert "leader        n3 (peer address 127.0.0.1:17106)" in lines
    assert not any(" at 127.0.0.1:17106" in line for line in lines)
    follower.leader_id, follower.leader_address = "", ""
    assert "leader        (none known)" in kvcli.status_table(follower).splitlines()


async def test_status_against_a_node(mem_node: NodeServer) -> None:
    ep = f"127.0.0.1:{mem_node.port}"
    rc, out, _ = await run_cli("kv", "status", "--endpoint", ep)
    assert rc == 0 and out.splitlines()[0] == "node          m1"
    assert "keys          0" in out
    rc, out, _ = await run_cli("kv", "status", "--endpoint", ep, "--json")
    assert rc == 0 and json.loads(out)["status"]["node_id"] == "m1"


HEAVY = "{'harness', 'matplotlib', 'rich', 'cryptography', 'yaml', 'numpy', 'jsonschema'}"


def _modules_after(code: str) -> list[str]:
    script = (
        "import sys\n"
        f"{code}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY}))\n"
        "print('grpc' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    return [*json.loads(out[0].replace("'", '"')), f"grpc={out[1]}"]


def test_caplab_kv_imports_nothing_heavy() -> None:
    """`caplab kv` starts in a fraction of a second: nothing of the harness (matplotlib,
    rich, yaml...) is imported, not even to register the harness's subcommands; the module
    itself imports no grpc either."""
    assert _modules_after("from caplab import cli") == ["grpc=False"]
    parsed = "from caplab import cli\ncli.build_parser(A).parse_args(A)"
    argv = "A = ['kv', '--endpoint', '127.0.0.1:1', 'get', 'x']"
    assert _modules_after(f"{argv}\n{parsed}") == ["grpc=False"]
    run = (
        "from caplab import cli\n"
        "A = ['kv', '--endpoint', '127.0.0.1:1', '--retries', '0', 'put', 'x', 'y']\n"
        "assert cli.main(A) == 1"
    )
    assert _modules_after(run) == ["grpc=True"]
    # the harness's commands are still there when asked for
    assert "harness" in _modules_after("from caplab import cli\ncli.build_parser(['demo'])")


def test_node_runs_insecure_without_peer_listen() -> None:
    """--peer-listen's default went through HOST:PORT parsing: `caplab node --insecure`
    without --peer-listen was a usage error although the README documents it."""
    argv = ["node", "--store", "raft", "--id", "a", "--listen", "127.0.0.1:7001"]
    args = build_parser(argv).parse_args([*argv, "--data-dir", "d", "--insecure"])
    assert not args.peer_listen


def _interrupt_a_call_that_hangs(op: list[str]) -> tuple[int, str, str]:
    """Run `caplab kv OP` against a server that accepts the connection, and even the call,
    but never answers; once the request has arrived, send SIGINT (Ctrl-C)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        argv = ["kv", "--endpoint", f"127.0.0.1:{port}", "--timeout", "60", *op]
        proc = subprocess.Popen(
            [sys.executable, "-m", "caplab.cli", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            with conn:
                conn.sendall(bytes.fromhex("000000040000000000"))  # HTTP/2: empty SETTINGS
                received, deadline = b"", time.monotonic() + 30
                method = f"/caplab.v1.KV/{op[0].capitalize()}".encode()
                while method not in received:
                    assert time.monotonic() < deadline, received
                    conn.settimeout(max(0.1, deadline - time.monotonic()))
                    chunk = conn.recv(65536)
                    assert chunk, "the client closed the connection"
                    received += chunk
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, out.decode(), err.decode()


def test_ctrl_c_says_whether_the_request_may_have_been_applied() -> None:
    """Ctrl-C during a call exited 130 without a word."""
    rc, out, err = _interrupt_a_call_that_hangs(["put", "k", "v"])
    assert (rc, out) == (130, "")
    assert err == "caplab: interrupted: outcome unknown (the request may have been applied)\n"
    rc, out, err = _interrupt_a_call_that_hangs(["get", "k"])
    assert (rc, out, err) == (130, "", "caplab: interrupted\n")
