"""The `caplab cluster` console: its parser and status table alone, then the real thing
driven through a pseudo-terminal (a raft leader killed and replaced; a gossip partition
that diverges and converges after the heal)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from caplab.v1 import kv_pb2
from harness.console import (
    CommandError,
    Get,
    Heal,
    Help,
    Partition,
    ProcessCommand,
    ProcessState,
    Put,
    Quit,
    Skew,
    Status,
    parse_command,
    parse_duration_ms,
    render_status,
    status_rows,
)
from tests.polling import eventually

NODES = ["n1", "n2", "n3", "n4", "n5"]


# -- parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("status", Status()),
        ("  STATUS  ", Status()),
        ("help", Help()),
        ("quit", Quit()),
        ("exit", Quit()),
        ("heal", Heal()),
        ("kill n2", ProcessCommand(action="kill", node="n2")),
        ("restart n2", ProcessCommand(action="restart", node="n2")),
        ("pause n1", ProcessCommand(action="pause", node="n1")),
        ("resume n1", ProcessCommand(action="resume", node="n1")),
        (
            "partition n1,n2 | n3,n4,n5",
            Partition(groups=(("n1", "n2"), ("n3", "n4", "n5"))),
        ),
        ("partition n1,n2|n3", Partition(groups=(("n1", "n2"), ("n3",), ("n4", "n5")))),
        ("partition n3", Partition(groups=(("n3",), ("n1", "n2", "n4", "n5")))),
        ("partition n1 n2 | n3", Partition(groups=(("n1", "n2"), ("n3",), ("n4", "n5")))),
        ("skew n3 +5s", Skew(node="n3", skew_ms=5000)),
        ("skew n3 -250ms", Skew(node="n3", skew_ms=-250)),
        ("skew n3 0", Skew(node="n3", skew_ms=0)),
        ("put k v", Put(key="k", value="v", node=None)),
        ("put k v on n2", Put(key="k", value="v", node="n2")),
        ("put k 'hello world' on n2", Put(key="k", value="hello world", node="n2")),
        ("put k on", Put(key="k", value="on", node=None)),
        ("get k", Get(key="k", node=None, consistency="default")),
        ("get k on n2", Get(key="k", node="n2", consistency="default")),
        ("get k local", Get(key="k", node=None, consistency="local")),
        ("get k on n4 linearizable", Get(key="k", node="n4", consistency="linearizable")),
        ("get k local on n4", Get(key="k", node="n4", consistency="local")),
    ],
)
def test_parse(line: str, expected: object) -> None:
    assert parse_command(line, NODES) == expected


@pytest.mark.parametrize("line", ["", "   ", "# a comment"])
def test_blank_lines_are_no_command(line: str) -> None:
    assert parse_command(line, NODES) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("frobnicate", "unknown command 'frobnicate'"),
        ("kill", "usage: kill NODE"),
        ("kill n9", "unknown node 'n9'; nodes are n1, n2, n3, n4, n5"),
        ("kill n1 n2", "usage: kill NODE"),
        ("partition", "usage: partition"),
        ("partition n1,n2,n3,n4,n5", "cuts nothing"),
        ("partition n1 | n1,n2", "n1 is in more than one group"),
        ("partition n1 | | n2", "empty group"),
        ("skew n3 5", "expected a duration"),
        ("skew n3 soon", "expected a duration"),
        ("skew n3 +2d", "expected a duration"),
        ("skew n3 +25h", "at most one day"),
        ("put k", "usage: put KEY VALUE"),
        ("put k v on n9", "unknown node 'n9'"),
        ("get", "usage: get KEY"),
        ("get k on", "usage: get KEY"),
        ("get k stale", "usage: get KEY"),
        ("get k local local", "usage: get KEY"),
        ("put k 'unclosed", "quotation"),
        ("status now", "usage: status"),
    ],
)
def test_parse_errors_say_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        parse_command(line, NODES)


def test_durations() -> None:
    assert parse_duration_ms("+1.5s") == 1500
    assert parse_duration_ms("-2m") == -120_000
    assert parse_duration_ms("1h") == 3_600_000
    assert parse_duration_ms("0s") == 0


# -- the status table ------------------------------------------------------------------
def _raft(
    node: str, role: str, term: int, commit: int, applied: int, leader: str
) -> kv_pb2.StatusResponse:
    return kv_pb2.StatusResponse(
        node_id=node,
        role=role,
        term=term,
        commit_index=commit,
        applied_index=applied,
        leader_id=leader,
        keys=4,
        state_digest=bytes.fromhex("abcdef0123"),
    )


def test_raft_rows_show_lag_behind_the_newest_leader_and_dead_nodes() -> None:
    answers: dict[str, kv_pb2.StatusResponse | str] = {
        "n1": _raft("n1", "leader", 2, 10, 10, "n1"),  # deposed, not yet told
        "n2": _raft("n2", "leader", 3, 12, 11, "n2"),
        "n3": _raft("n3", "follower", 3, 12, 7, "n2"),
        "n4": "not running",
    }
    processes: dict[str, ProcessState] = {"n1": "up", "n2": "up", "n3": "up", "n4": "down"}
    rows = status_rows("raft", processes, answers, [("n1",), ("n2", "n3", "n4")])
    by = {r.node: r for r in rows}
    assert [r.node for r in rows] == ["n1", "n2", "n3", "n4"]
    assert by["n3"].lag == 5 and by["n2"].lag == 1 and by["n1"].lag == 2
    assert (by["n1"].group, by["n3"].group) == ("1", "2")
    assert by["n4"].role == "?" and by["n4"].error == "not running"
    text = render_status("raft", rows)
    assert text.splitlines()[-1] == "leader: n2 (term 3)"
    n3_line = next(line for line in text.splitlines() if line.startswith("n3"))
    assert n3_line.split()[:7] == ["n3", "up", "follower", "3", "12/7", "5", "n2"]
    n4_line = next(line for line in text.splitlines() if line.startswith("n4"))
    assert "down" in n4_line and "(not running)" in n4_line


def test_raft_without_leader_says_so() -> None:
    rows = status_rows(
        "raft",
        {"n1": "up", "n2": "paused"},
        {"n1": _raft("n1", "candidate", 5, 3, 3, ""), "n2": "paused"},
        None,
    )
    assert render_status("raft", rows).splitlines()[-1].startswith("leader: none")


def test_gossip_rows_count_states_and_show_suspects() -> None:
    def st(node: str, digest: bytes, dead: str = "") -> kv_pb2.StatusResponse:
        r = kv_pb2.StatusResponse(node_id=node, role="replica", keys=2, state_digest=digest)
        r.clock_skew_ms = 5000 if node == "n3" else 0
        if dead:
            r.members.add(node_id=dead, state=kv_pb2.MEMBER_STATE_DEAD)
        return r

    answers: dict[str, kv_pb2.StatusResponse | str] = {
        "n1": st("n1", b"\x01" * 8, dead="n2"),
        "n2": st("n2", b"\x02" * 8),
        "n3": st("n3", b"\x02" * 8),
    }
    up: dict[str, ProcessState] = dict.fromkeys(answers, "up")
    rows = status_rows("gossip", up, answers, None)
    text = render_status("gossip", rows)
    assert text.splitlines()[-1] == "replicas: 2 distinct states among 3 answering (diverged)"
    assert text.splitlines()[1].split() == ["n1", "up", "replica", "2", "n2", "-", "01010101"]
    assert text.splitlines()[3].split()[-1] == "+5s"
    same = status_rows("gossip", {"n2": "up", "n3": "up"}, answers, None)
    assert render_status("gossip", same).endswith("1 distinct state among 2 answering (identical)")


# -- through a pseudo-terminal ---------------------------------------------------------
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class Terminal:
    """`caplab cluster` on a pty (its controlling terminal, so Ctrl-C is a real SIGINT)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
        # a new session whose controlling terminal is the pty (setsid --ctty), started
        # without pty.fork(): forking this multi-threaded process warns (and may deadlock)
        fd, tty = os.openpty()
        self.proc = subprocess.Popen(
            ["setsid", "--ctty", sys.executable, "-m", "caplab.cli", *args],
            stdin=tty,
            stdout=tty,
            stderr=tty,
            env=env,
        )
        os.close(tty)
        self.pid, self.fd = self.proc.pid, fd
        self.buffer = b""
        self.exit_status: int | None = None

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Read until `pattern` appears in the output not consumed yet; consume up to it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        while True:
            clean = _ANSI.sub(b"", self.buffer)
            m = regex.search(clean)
            if m is not None:
                self.buffer = clean[m.end() :]
                return re.match(pattern, m.group(0).decode())  # type: ignore[return-value]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout}s; output: {clean!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF before {pattern!r}; output: {clean!r}")
                self.buffer += chunk

    def command(self, line: str, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        self.expect(r"caplab> ", timeout)
        os.write(self.fd, line.encode() + b"\r")
        self.expect(re.escape(line), 5.0)  # the echo
        return self.expect(pattern, timeout)

    def exited(self) -> bool:
        if self.exit_status is None:
            # read the terminal so the child never blocks writing to it (kept for messages)
            while select.select([self.fd], [], [], 0)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.buffer = (self.buffer + chunk)[-20000:]
            self.exit_status = self.proc.poll()
        return self.exit_status is not None

    def output(self) -> str:
        return _ANSI.sub(b"", self.buffer).decode(errors="replace")

    def close(self) -> None:
        if self.exit_status is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def processes_mentioning(path: Path, also: str = "") -> list[int]:
    """Pids of live processes whose command line mentions `path` (and `also`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and also.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def blocked_signals(pid: int) -> int:
    """The signal mask of a process (bit n-1: signal n)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.findall(r"SigBlk:\s*(\w+)", status)[0], 16)


async def _quit(term: Terminal, keys: bytes, data: Path) -> None:
    term.expect(r"caplab> ")
    os.write(term.fd, keys)
    term.expect(r"stopping\.\.\.")
    await eventually(term.exited, 30.0)
    assert term.exit_status == 0, term.output()
    assert processes_mentioning(data) == [], "a node outlived `caplab cluster`"


@pytest.mark.integration
async def test_kill_the_raft_leader_and_watch_a_new_one(tmp_path: Path) -> None:
    term = Terminal(["cluster", "--store", "raft", "--nodes", "3", "--data-dir", str(tmp_path)])
    try:
        term.expect(r"Admin is enabled", 60.0)
        leaders: list[str] = []

        def leader_elected() -> bool:
            m = term.command("status", r"leader: (n\d|none)")
            leaders.append(m.group(1))
            return m.group(1) != "none"

        await eventually(leader_elected, 30.0, interval=0.2)
        old = leaders[-1]
        term.command(f"kill {old}", rf"killed {old} \(SIGKILL\)")

        def new_leader() -> bool:
            m = term.command("status", r"leader: (n\d|none)")
            leaders.append(m.group(1))
            return m.group(1) not in (old, "none")

        await eventually(new_leader, 30.0, interval=0.2)
        new = leaders[-1]
        term.command(f"put k v on {new}", rf"ok, put via {new}")
        assert term.command("get k", r"k = '(\w+)'").group(1) == "v"
        term.command("frobnicate", r"error: unknown command 'frobnicate'")  # and goes on
        old_row = term.command("status", rf"{old} +down +\?")
        assert old_row
        term.command(f"restart {old}", rf"{old} is back")
        [pid] = processes_mentioning(tmp_path, f"--id\0{old}\0")
        blocked = blocked_signals(pid)
        assert not blocked & (1 << (signal.SIGTERM - 1)), "a restarted node ignores SIGTERM"
        # a node that dies by itself is reported at the prompt, once, with its log
        follower = next(n for n in ("n1", "n2", "n3") if n not in (old, new))
        [pid] = processes_mentioning(tmp_path, f"--id\0{follower}\0")
        os.kill(pid, signal.SIGKILL)
        term.expect(rf"node {follower} exited with code -9; see \S+{follower}\.log")
        await _quit(term, b"quit\r", tmp_path)
    finally:
        term.close()


@pytest.mark.integration
async def test_gossip_partition_diverges_then_heals(tmp_path: Path) -> None:
    term = Terminal(
        ["cluster", "--store", "gossip", "--nodes", "3", "--data-dir", str(tmp_path),
         "--set", "anti_entropy_interval_ms=300", "--set", "suspicion_timeout_ms=600"]
    )  # fmt: skip
    try:
        term.expect(r"Admin is enabled", 60.0)
        term.command("partition n1 | n2,n3", r"partition: n1 \| n2,n3")
        term.command("put k left on n1", r"ok, put via n1")
        term.command("put k right on n2", r"ok, put via n2")
        assert term.command("get k on n1", r"k = '(\w+)'").group(1) == "left"
        assert term.command("get k on n2", r"k = '(\w+)'").group(1) == "right"

        def states(n: int) -> Callable[[], bool]:
            return lambda: term.command("status", r"replicas: (\d+) distinct").group(1) == str(n)

        await eventually(states(2), 30.0, interval=0.2)  # n2 and n3 agree, n1 differs
        term.command("heal", r"healed")
        await eventually(states(1), 30.0, interval=0.2)
        one = term.command("get k on n1", r"k = '(\w+)'").group(1)
        assert term.command("get k on n3", r"k = '(\w+)'").group(1) == one
        await _quit(term, b"\x03", tmp_path)  # Ctrl-C at the prompt: a clean quit
    finally:
        term.close()
