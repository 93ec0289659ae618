"""`caplab cluster` in the foreground: N local nodes, and a console to break them by hand.

Theory of operation
-------------------
Two modes, chosen by `caplab cluster --console/--no-console` (default: the console when
stdin is a terminal):

* **headless** (:func:`run_headless`): start the nodes, print their endpoints, run until
  SIGINT/SIGTERM. A node that dies is reported once (with its log) and the others keep
  running.
* **console** (:func:`run_console`): the same nodes, but their peer links go through a
  :class:`~harness.proxy.ProxyNet` (one TCP proxy per directed link; TLS between the nodes
  passes through untouched, peers dial each other by id) so that ``partition``/``heal``
  can cut them while clients still reach every node directly, and Admin is enabled for
  ``skew``. The main thread reads commands at a ``caplab>`` prompt (stdlib ``input`` with
  ``readline``); everything that touches the cluster, the proxies or gRPC runs on one
  asyncio loop in a background thread (:class:`_LoopThread`), one command at a time, so
  the cluster is only ever touched from that thread. A watcher task on the same loop
  reports nodes that exit by themselves. ``quit``, Ctrl-D, Ctrl-C at the prompt and
  SIGTERM all stop every node gracefully; Ctrl-C during a command only abandons it.

The console is split so that the parts worth testing alone are pure:
:func:`parse_command` turns a line into a :data:`Command` (or raises :class:`CommandError`),
:func:`status_rows` and :func:`render_status` turn Status answers into the table. The
:class:`Console` executes commands against a cluster and returns the text to print.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from caplab import errors
from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.cluster import LocalCluster, NodeProcess, free_ports
from harness.nemesis import from_groups
from harness.proxy import LinkMode, ProxyNet

T = TypeVar("T")

PROMPT = "caplab> "
MAX_SKEW_MS = 86_400_000  # the nodes' bound: +-1 day

HELP = """\
commands (nodes are named n1, n2, ...):
  status                          every node: role, term, progress, leader, lag, process, group
  kill n2                         SIGKILL a node (no chance to flush or hand over)
  restart n2                      start a stopped or dead node again, same identity and data
  pause n1 / resume n1            SIGSTOP / SIGCONT a node (it answers nothing meanwhile)
  partition n1,n2 | n3,n4,n5      cut the peer links between the groups (nodes left out
                                  form one more group); clients still reach every node
  heal                            every peer link passes again
  skew n3 +5s                     shift a node's clock (ms, s, m, h; 0 resets)
  put KEY VALUE [on n2]           write through a node (default: the first one up)
  get KEY [on n2] [local|linearizable]
                                  read through a node (default level: the store's own)
  help                            this text
  quit                            stop every node and leave (Ctrl-D and Ctrl-C too)"""


class CommandError(ValueError):
    """A line that is not a valid command; the message says what is wrong."""


# -- commands -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Status:
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class Quit:
    pass


ProcessAction = Literal["kill", "restart", "pause", "resume"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ProcessCommand:
    action: ProcessAction
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Partition:
    groups: tuple[tuple[str, ...], ...]  # disjoint, covering every node, at least two


@dataclass(frozen=True, kw_only=True, slots=True)
class Heal:
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class Skew:
    node: str
    skew_ms: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Put:
    key: str
    value: str
    node: str | None


Consistency = Literal["default", "local", "linearizable"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Get:
    key: str
    node: str | None
    consistency: Consistency


Command = Status | Help | Quit | ProcessCommand | Partition | Heal | Skew | Put | Get

_PROCESS_ACTIONS: tuple[ProcessAction, ...] = ("kill", "restart", "pause", "resume")
COMMAND_NAMES = ("status", *_PROCESS_ACTIONS, "partition", "heal", "skew", "put", "get")
COMMAND_NAMES += ("help", "quit")
_DURATION = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def _node(text: str, nodes: Sequence[str]) -> str:
    if text not in nodes:
        raise CommandError(f"unknown node {text!r}; nodes are {', '.join(nodes)}")
    return text


def parse_duration_ms(text: str) -> int:
    """``+5s``, ``-250ms``, ``1.5m``, ``2h``, ``0`` -> milliseconds (a unit is required
    except for 0)."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or (m.group(3) is None and float(m.group(2)) != 0):
        raise CommandError(f"expected a duration like +5s, -250ms or 0, got {text!r}")
    ms = round(float(m.group(2)) * _UNIT_MS[m.group(3) or "ms"])
    ms = -ms if m.group(1) == "-" else ms
    if abs(ms) > MAX_SKEW_MS:
        raise CommandError(f"a clock skew is at most one day either way, got {text!r}")
    return ms


def parse_groups(text: str, nodes: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """``n1,n2 | n3`` -> disjoint groups; nodes listed in none form one more group."""
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for side in text.split("|"):
        members = tuple(_node(n, nodes) for n in re.split(r"[,\s]+", side.strip()) if n)
        if not members:
            raise CommandError("empty group: write e.g. partition n1,n2 | n3,n4,n5")
        for n in members:
            if n in seen:
                raise CommandError(f"node {n} is in more than one group")
            seen.add(n)
        groups.append(members)
    rest = tuple(n for n in nodes if n not in seen)
    if rest:
        groups.append(rest)
    if len(groups) < 2:
        raise CommandError("that partition cuts nothing: name at least two groups")
    return tuple(groups)


def parse_command(line: str, nodes: Sequence[str]) -> Command | None:
    """One console line -> a command (None for a blank line). Raises CommandError."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:  # unbalanced quotes
        raise CommandError(str(e)) from None
    if not words:
        return None
    name, args = words[0].lower(), words[1:]

    def arity(n: int, usage: str) -> None:
        if len(args) != n:
            raise CommandError(f"usage: {usage}")

    if name == "status":
        arity(0, "status")
        return Status()
    if name in ("help", "?"):
        return Help()
    if name in ("quit", "exit"):
        arity(0, name)
        return Quit()
    if name == "heal":
        arity(0, "heal")
        return Heal()
    for action in _PROCESS_ACTIONS:
        if name == action:
            arity(1, f"{action} NODE")
            return ProcessCommand(action=action, node=_node(args[0], nodes))
    if name == "partition":
        if not args:
            raise CommandError("usage: partition n1,n2 | n3,n4,n5")
        return Partition(groups=parse_groups(" ".join(args), nodes))
    if name == "skew":
        arity(2, "skew NODE +5s")
        return Skew(node=_node(args[0], nodes), skew_ms=parse_duration_ms(args[1]))
    if name == "put":
        node = None
        if len(args) == 4 and args[2].lower() == "on":
            node, args = _node(args[3], nodes), args[:2]
        arity(2, "put KEY VALUE [on NODE]  (quote a value with spaces)")
        return Put(key=args[0], value=args[1], node=node)
    if name == "get":
        usage = "get KEY [on NODE] [local|linearizable]"
        if not args:
            raise CommandError(f"usage: {usage}")
        key, rest = args[0], args[1:]
        get_node: str | None = None
        consistency: Consistency = "default"
        while rest:
            word = rest[0].lower()
            if word == "on" and len(rest) >= 2 and get_node is None:
                get_node, rest = _node(rest[1], nodes), rest[2:]
            elif word in ("local", "linearizable") and consistency == "default":
                consistency = "local" if word == "local" else "linearizable"
                rest = rest[1:]
            else:
                raise CommandError(f"usage: {usage}")
        return Get(key=key, node=get_node, consistency=consistency)
    raise CommandError(f"unknown command {words[0]!r}; type help for the list")


# -- the status table -----------------------------------------------------------------
ProcessState = Literal["up", "down", "paused"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusRow:
    node: str
    process: ProcessState
    role: str  # "?" when the node did not answer
    term: int | None
    commit: int | None  # raft
    applied: int | None  # raft
    keys: int | None
    leader: str  # raft: whom this node follows ("" unknown)
    lag: int | None  # raft: entries the leader committed that this node has not applied
    unseen: tuple[str, ...]  # gossip: members this node considers suspect or dead
    digest: str  # short state digest: equal digests, equal states
    skew_ms: int
    group: str  # "1", "2", ... in the current partition; "" when none
    error: str  # why it did not answer


def _leader(answers: Mapping[str, kv_pb2.StatusResponse | str]) -> kv_pb2.StatusResponse | None:
    """The answer of the node that claims leadership with the highest term."""
    best: kv_pb2.StatusResponse | None = None
    for st in answers.values():
        if (
            isinstance(st, kv_pb2.StatusResponse)
            and st.role == "leader"
            and (best is None or st.term > best.term)
        ):
            best = st
    return best


def status_rows(
    store: str,
    processes: Mapping[str, ProcessState],
    answers: Mapping[str, kv_pb2.StatusResponse | str],
    groups: Sequence[Sequence[str]] | None,
) -> list[StatusRow]:
    """One row per node (in `processes` order); `answers` holds each node's Status or the
    reason it gave none."""
    group_of = {n: str(i + 1) for i, g in enumerate(groups or ()) for n in g}
    leader = _leader(answers) if store == "raft" else None
    rows = []
    for node, process in processes.items():
        st = answers.get(node, "not asked")
        group = group_of.get(node, "")
        if not isinstance(st, kv_pb2.StatusResponse):
            rows.append(
                StatusRow(
                    node=node,
                    process=process,
                    group=group,
                    role="?",
                    term=None,
                    commit=None,
                    applied=None,
                    keys=None,
                    leader="",
                    lag=None,
                    unseen=(),
                    digest="",
                    skew_ms=0,
                    error=st,
                )
            )
            continue
        raft = store == "raft"
        lag = None
        if raft:
            top = leader.commit_index if leader is not None else st.commit_index
            lag = max(0, top - st.applied_index)
        unseen = tuple(
            m.node_id
            for m in st.members
            if m.state in (kv_pb2.MEMBER_STATE_SUSPECT, kv_pb2.MEMBER_STATE_DEAD)
        )
        rows.append(
            StatusRow(
                node=node,
                process=process,
                group=group,
                role=st.role,
                term=st.term if raft else None,
                commit=st.commit_index if raft else None,
                applied=st.applied_index if raft else None,
                keys=st.keys,
                leader=st.leader_id if raft else "",
                lag=lag,
                unseen=unseen,
                digest=st.state_digest.hex()[:8],
                skew_ms=st.clock_skew_ms,
                error="",
            )
        )
    return rows


def _fmt_skew(ms: int) -> str:
    if not ms:
        return ""
    return f"{ms / 1000:+g}s" if ms % 1000 == 0 else f"{ms:+d}ms"


def render_status(store: str, rows: Sequence[StatusRow]) -> str:
    """The table and a one-line summary (raft: the leader; gossip: how many states)."""

    def opt(v: int | None) -> str:
        return "" if v is None else str(v)

    if store == "raft":
        header = ["node", "process", "role", "term", "commit/applied", "lag", "leader", "keys"]
    else:
        header = ["node", "process", "role", "keys", "sees down"]
    header += ["group", "digest", "skew"]
    table = [header]
    for r in rows:
        if store == "raft":
            progress = "" if r.commit is None else f"{r.commit}/{r.applied}"
            cells = [r.node, r.process, r.role, opt(r.term), progress, opt(r.lag), r.leader]
            cells.append(opt(r.keys))
        else:
            cells = [r.node, r.process, r.role, opt(r.keys), ",".join(r.unseen)]
        cells += [r.group or "-", r.digest, _fmt_skew(r.skew_ms)]
        if r.error:
            cells.append(f"({r.error})")
        table.append(cells)
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(widths[i]) if i < len(widths) else c for i, c in enumerate(row))
        for row in table
    ]
    answered = [r for r in rows if not r.error]
    if store == "raft":
        leaders = sorted(
            (r for r in answered if r.role == "leader"), key=lambda r: r.term or 0, reverse=True
        )
        if leaders:
            summary = f"leader: {leaders[0].node} (term {leaders[0].term})"
        else:
            summary = "leader: none (an election is under way, or no majority can talk)"
    else:
        states = len({r.digest for r in answered})
        summary = (
            f"replicas: {states} distinct state{'s' if states != 1 else ''} "
            f"among {len(answered)} answering"
            + (" (diverged)" if states > 1 else " (identical)" if answered else "")
        )
    return "\n".join([*(line.rstrip() for line in lines), summary])


# -- executing commands ----------------------------------------------------------------
def _store_error(e: errors.StoreError) -> str:
    if e.code.name == "UNIMPLEMENTED":
        return f"not served ({e.code.name}): {e.message}"
    kind = "refused, not applied" if e.definite else "outcome unknown"
    return f"{kind} ({e.code.name}): {e.message}"


def _show_value(value: bytes | int | None) -> str:
    if isinstance(value, bytes):
        try:
            return repr(value.decode())
        except UnicodeDecodeError:
            return repr(value)
    return str(value)


def _where(header: kv_pb2.ResponseHeader) -> str:
    parts = [f"answered by {header.node_id}"]
    if header.forwarded_by:
        parts.append(f"forwarded by {header.forwarded_by}")
    if header.term or header.index:
        parts.append(f"term {header.term}, index {header.index}")
    if header.HasField("hlc"):
        parts.append(f"hlc {header.hlc.wall_ms}.{header.hlc.logical}@{header.hlc.node_id}")
    if header.stale_possible:
        parts.append("may be stale")
    return "; ".join(parts)


class Console:
    """Executes console commands against a cluster whose peer links go through `net`.
    Create, use and close it on one event loop (the one running the proxies)."""

    def __init__(
        self,
        cluster: LocalCluster,
        net: ProxyNet,
        *,
        timeout: float = 3.0,
        status_timeout: float = 1.5,
    ) -> None:
        self.cluster = cluster
        self.net = net
        self.status_timeout = status_timeout
        self.groups: tuple[tuple[str, ...], ...] | None = None
        self.clients = {n: KVClient([ep], timeout=timeout) for n, ep in cluster.endpoints.items()}

    def _process(self, node: NodeProcess) -> ProcessState:
        if not node.running:
            return "down"
        return "paused" if node.paused else "up"

    async def _status_of(self, node_id: str) -> kv_pb2.StatusResponse | str:
        node = self.cluster.nodes[node_id]
        state = self._process(node)
        if state != "up":
            return "paused: answers nothing" if state == "paused" else "not running"
        try:
            return await asyncio.wait_for(
                self.clients[node_id].status(endpoint=node.address), self.status_timeout
            )
        except TimeoutError:
            return "no answer in time"
        except errors.StoreError as e:
            return f"{e.code.name}: {e.message}"

    async def status(self) -> str:
        ids = list(self.cluster.nodes)
        answers = await asyncio.gather(*(self._status_of(n) for n in ids))
        processes = {n: self._process(self.cluster.nodes[n]) for n in ids}
        rows = status_rows(
            self.cluster.store, processes, dict(zip(ids, answers, strict=True)), self.groups
        )
        text = render_status(self.cluster.store, rows)
        if self.groups:
            text += "\npartition: " + " | ".join(",".join(g) for g in self.groups)
        return text

    def _default_node(self) -> str:
        for n, node in self.cluster.nodes.items():
            if node.running and not node.paused:
                return n
        raise CommandError("no node is up: restart one first")

    async def _process_command(self, cmd: ProcessCommand) -> str:
        node = self.cluster.nodes[cmd.node]
        n = cmd.node
        if cmd.action == "kill":
            if not node.running:
                return f"{n} is not running"
            node.kill()
            return f"killed {n} (SIGKILL); `restart {n}` starts it again with its data"
        if cmd.action == "restart":
            if node.running:
                return f"{n} is paused: `resume {n}`" if node.paused else f"{n} is running"
            node.start()
            self.net.reset_links_to([n])
            try:
                await self.cluster.wait_ready(timeout=30.0, nodes=[n])
            except (RuntimeError, TimeoutError) as e:
                return f"{n} did not come back: {e}"
            return f"{n} is back (same identity and data)"
        if cmd.action == "pause":
            if not node.running:
                return f"{n} is not running"
            if node.paused:
                return f"{n} is already paused"
            node.pause()
            return f"paused {n} (SIGSTOP): it answers nothing until `resume {n}`"
        if not node.paused:
            return f"{n} is not paused"
        node.resume()
        return f"resumed {n}"

    async def execute(self, cmd: Command) -> str:
        """Run one command; returns what to print. Store refusals are messages, not
        exceptions (CommandError for a command that cannot apply now)."""
        match cmd:
            case Status():
                return await self.status()
            case Help():
                return HELP
            case Quit():
                return ""
            case ProcessCommand():
                return await self._process_command(cmd)
            case Partition(groups=groups):
                cut = from_groups(list(self.cluster.nodes), groups).blocked
                self.net.apply(cut, LinkMode.DROP)
                self.groups = groups
                sides = " | ".join(",".join(g) for g in groups)
                return (
                    f"partition: {sides} (peer links between the groups drop everything; "
                    "clients still reach every node)"
                )
            case Heal():
                self.net.heal()
                self.groups = None
                return "healed: every peer link passes"
            case Skew(node=n, skew_ms=ms):
                try:
                    now = await self.clients[n].set_clock_skew(ms, self.cluster.nodes[n].address)
                except errors.StoreError as e:
                    if e.code.name == "UNIMPLEMENTED":
                        return f"{n} does not serve Admin: start the cluster with --enable-admin"
                    return f"{n}: {_store_error(e)}"
                return f"{n}'s clock now runs {_fmt_skew(now) or '+0s'} off"
            case Put(key=key, value=value, node=n):
                n = n or self._default_node()
                client = self.clients[n]
                try:
                    resp = await client.put(key, value.encode())
                except errors.StoreError as e:
                    return f"put via {n}: {_store_error(e)}"
                return f"ok, put via {n} ({_where(resp.header)})"
            case Get(key=key, node=n, consistency=level):
                n = n or self._default_node()
                consistency = {
                    "default": kv_pb2.CONSISTENCY_DEFAULT,
                    "local": kv_pb2.CONSISTENCY_LOCAL,
                    "linearizable": kv_pb2.CONSISTENCY_LINEARIZABLE,
                }[level]
                try:
                    got = await self.clients[n].get(key, consistency)
                except errors.StoreError as e:
                    return f"get via {n}: {_store_error(e)}"
                shown = _show_value(got.value) if got.found else "(not found)"
                return f"{key} = {shown}  ({_where(got.header)})"
        raise AssertionError(f"unhandled command {cmd!r}")

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()


# -- running the cluster ---------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterOptions:
    store: str
    nodes: int
    root: Path
    base_port: int | None = None
    enable_admin: bool = False
    secure: bool = True
    extra_args: tuple[str, ...] = ()


def banner(cluster: LocalCluster, opts: ClusterOptions) -> str:
    lines = [f"{opts.store} cluster of {opts.nodes} nodes; data and logs in {opts.root}"]
    if cluster.secure:
        lines.append(
            f"peer traffic: mutual TLS (certificates in {cluster.certs}; client tokens in "
            f"{cluster.certs / 'clients'})"
        )
    else:
        lines.append("peer traffic: NOT authenticated (--insecure)")
    lines += [f"  {node_id}  {ep}" for node_id, ep in cluster.endpoints.items()]
    return "\n".join(lines)


def _exit_message(node: NodeProcess) -> str:
    return (
        f"node {node.node_id} exited with code {node.returncode}; see {node.log_path} "
        "(the other nodes keep running)"
    )


def run_headless(opts: ClusterOptions) -> int:
    """Start the nodes, print their endpoints, run until SIGINT/SIGTERM."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalCluster(
        opts.store,
        opts.nodes,
        opts.root,
        base_port=opts.base_port,
        enable_admin=opts.enable_admin,
        secure=opts.secure,
        extra_args=opts.extra_args,
    ) as cluster:
        cluster.start()
        asyncio.run(cluster.wait_ready())
        print(banner(cluster, opts))
        flags = " ".join(f"--endpoint {ep}" for ep in cluster.endpoints.values())
        print(f"try: caplab kv {flags} put hello world")
        print("Ctrl-C stops every node.", flush=True)
        while not stop:
            for node in cluster.unexpected_exits():
                print(_exit_message(node), file=sys.stderr, flush=True)
            time.sleep(0.2)
        print("stopping...", flush=True)
    return 0


class _LoopThread:
    """An asyncio loop running in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="caplab-console", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        # Ctrl-C and SIGTERM must reach the main thread: readline waits in select() there,
        # which only a signal delivered to that thread interrupts. Threads started from
        # here (gRPC's, the loop's executor) inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class _Signals:
    """Ctrl-C (KeyboardInterrupt) and SIGTERM (_Terminate) interrupt the prompt, always.

    readline waits in select() and runs Python's signal handlers only when select() fails
    with EINTR. A signal that lands just before the main thread enters select() (after the
    prompt is drawn) only marks its handler as pending, and the prompt would wait for the
    next key. So Python's wakeup fd is watched from the loop thread: after a SIGINT or
    SIGTERM it sends the main thread SIGUSR1 (a handler that does nothing: it interrupts
    select() and lets the pending handler run), every 50 ms until that handler has run.
    """

    WATCHED = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self, runner: _LoopThread) -> None:
        self.runner = runner
        self.received = 0  # SIGINT/SIGTERM seen on the wakeup fd (loop thread)
        self.handled = 0  # their Python handlers run (main thread)
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.previous = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGINT, self._on_sigint),
                (signal.SIGTERM, self._on_sigterm),
                (signal.SIGUSR1, self._on_nudge),
            )
        }
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        main = threading.main_thread().ident
        assert main is not None
        self.main = main
        self.nudging: asyncio.Task[None] | None = None
        runner.loop.call_soon_threadsafe(runner.loop.add_reader, self.read_fd, self._on_wakeup)

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.handled += 1
        raise KeyboardInterrupt

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.handled += 1
        raise _Terminate

    def _on_nudge(self, signum: int, frame: object) -> None:
        pass

    def _on_wakeup(self) -> None:
        try:
            data = os.read(self.read_fd, 512)
        except BlockingIOError:
            return
        self.received += sum(1 for b in data if b in self.WATCHED)
        if self.received > self.handled and (self.nudging is None or self.nudging.done()):
            self.nudging = self.runner.loop.create_task(self._nudge())

    async def _nudge(self) -> None:
        for _ in range(100):
            if self.handled >= self.received:
                return
            signal.pthread_kill(self.main, signal.SIGUSR1)
            await asyncio.sleep(0.05)

    def ignore(self) -> None:
        """From now on Ctrl-C and SIGTERM are ignored (while the nodes stop)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        self.runner.run(self._stop())
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self.read_fd)
        os.close(self.write_fd)

    async def _stop(self) -> None:
        self.runner.loop.remove_reader(self.read_fd)
        if self.nudging is not None:
            self.nudging.cancel()


class _Terminate(BaseException):
    """SIGTERM arrived: leave the console as `quit` does (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it)."""


class _Screen:
    """Prints to the terminal; a message that arrives while the prompt waits is written
    above it and the prompt (with what was typed so far) drawn again."""

    def __init__(self, readline: Any | None) -> None:
        self.readline = readline
        self.at_prompt = False
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            if self.at_prompt and self.readline is not None:
                typed = self.readline.get_line_buffer()
                sys.stdout.write(f"\r\x1b[K{text}\n{PROMPT}{typed}")
            else:
                sys.stdout.write(f"{text}\n")
            sys.stdout.flush()

    def read(self) -> str:
        with self.lock:
            self.at_prompt = True
        try:
            return input(PROMPT)
        finally:
            with self.lock:
                self.at_prompt = False


def _readline(nodes: Sequence[str]) -> Any | None:
    """Line editing, history and tab completion when stdin is a terminal."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # pragma: no cover - platform without readline
        return None
    words = [*COMMAND_NAMES, *nodes, "on", "local", "linearizable"]

    def complete(text: str, state: int) -> str | None:
        matches = [w for w in words if w.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" ,|")
    readline.parse_and_bind("tab: complete")
    return readline


async def _watch(cluster: LocalCluster, say: Callable[[str], None]) -> None:
    while True:
        for node in cluster.unexpected_exits():
            say(_exit_message(node) + f"; `restart {node.node_id}` starts it again")
        await asyncio.sleep(0.25)


def _interruption(e: SystemError) -> BaseException | None:
    """The KeyboardInterrupt or _Terminate inside a SystemError, if that is what it is.

    After readline returns on a signal, ``input()`` checks the signals once more with the
    interrupt already raised; a nudge (SIGUSR1, see :class:`_Signals`) that arrived
    meanwhile then runs with that exception set and CPython wraps it: "SystemError:
    _on_nudge returned a result with an exception set" (the console exited 1)."""
    cause = e.__cause__ or e.__context__
    return cause if isinstance(cause, KeyboardInterrupt | _Terminate) else None


def _repl(runner: _LoopThread, console: Console, screen: _Screen) -> None:
    nodes = list(console.cluster.nodes)
    while True:
        try:
            try:
                line = screen.read()
            except SystemError as e:
                cause = _interruption(e)
                if cause is None:
                    raise
                raise cause from None
        except EOFError:  # Ctrl-D
            screen.say("")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave as quit does
            screen.say("")
            return
        try:
            cmd = parse_command(line, nodes)
            if cmd is None:
                continue
            if isinstance(cmd, Quit):
                return
            screen.say(runner.run(console.execute(cmd)))
        except CommandError as e:
            screen.say(f"error: {e}")
        except KeyboardInterrupt:
            screen.say("interrupted (the command may have taken effect); `quit` stops the nodes")
        except SystemError as e:
            cause = _interruption(e)
            if isinstance(cause, _Terminate):
                raise cause from None
            if cause is None:
                screen.say(f"error: SystemError: {e}")
            else:
                screen.say(
                    "interrupted (the command may have taken effect); `quit` stops the nodes"
                )
        except Exception as e:  # a bug or an unexpected failure: say it, keep the prompt
            screen.say(f"error: {type(e).__name__}: {e}")


def run_console(opts: ClusterOptions) -> int:
    """The cluster with peer links through proxies, Admin on, and the prompt."""
    n = opts.nodes
    ids = [f"n{i + 1}" for i in range(n)]
    if opts.base_port:
        ports = [opts.base_port + i for i in range(n)]
        peer_ports = [opts.base_port + n + i for i in range(n)]
    else:
        both = free_ports(2 * n)
        ports, peer_ports = both[:n], both[n:]
    runner = _LoopThread()
    net = ProxyNet(dict(zip(ids, peer_ports, strict=True)))
    signals = _Signals(runner)
    cluster: LocalCluster | None = None
    console: Console | None = None
    watcher: concurrent.futures.Future[None] | None = None
    try:
        runner.run(net.start())
        cluster = LocalCluster(
            opts.store,
            n,
            opts.root,
            ports=ports,
            peer_ports=peer_ports,
            peer_addresses=net.peer_addresses,
            enable_admin=True,
            secure=opts.secure,
            extra_args=opts.extra_args,
        )
        cluster.start()
        try:
            runner.run(cluster.wait_ready(timeout=60.0))
        except (RuntimeError, TimeoutError) as e:
            print(f"caplab: the cluster did not start: {e}", file=sys.stderr)
            return 1
        print(banner(cluster, opts))
        print(
            "peer links go through local proxies (partition/heal cut them; clients reach every "
            "node directly); Admin is enabled (skew)."
        )
        print("type help for the commands; quit (or Ctrl-D, Ctrl-C) stops every node.")
        screen = _Screen(_readline(ids))
        console = runner.run(_make_console(cluster, net))
        watcher = asyncio.run_coroutine_threadsafe(_watch(cluster, screen.say), runner.loop)
        _repl(runner, console, screen)
        return 0
    except _Terminate:
        return 0
    finally:
        # no interruption while the nodes stop
        signals.ignore()
        if watcher is not None:
            watcher.cancel()
        print("stopping...", flush=True)
        if console is not None:
            runner.run(console.close())
        if cluster is not None:
            cluster.close()
        runner.run(net.close())
        signals.close()
        runner.stop()


async def _make_console(cluster: LocalCluster, net: ProxyNet) -> Console:
    return Console(cluster, net)  # gRPC channels belong to the loop that creates them
