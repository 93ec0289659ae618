"""`caplab bench`: throughput and latency of the stores beside a raw grpc.aio no-op server
and, with `--compare etcd`, a real 3-member etcd cluster, all in one run.

For each store (`--store raft,gossip`: each in turn), each security mode of its peer links
(mutual TLS, the default of every cluster; then, with `--security both`, the default,
plaintext, to show what authentication costs), each client path (`--path`: unary RPCs,
and KV.Pipeline, many operations per message over one stream, see kv.proto), each op and
each client concurrency, closed-loop clients issue writes (Put of `--value-size` bytes,
each client with its own client_id/sequence, so that every write goes through
exactly-once deduplication; `--no-request-ids` leaves it out, to measure what it costs)
and then reads (Get at the store's default consistency: linearizable on raft, local on
gossip) for `--duration` seconds after a warm-up.

Every cell of a store comes right after the same cell of the no-op server (the ceiling
for any Python gRPC server here: it answers every unary call and every pipelined
operation with a canned response through the same pipeline code as the stores) and,
with `--compare etcd`, of etcd (Put, and Range with etcd's default linearizable reads,
over the same client code; etcd has no pipelined path, so its unary cells stand beside
both of ours), so that a machine whose speed drifts during the run (shared VMs do) skews
all alike. The figures that matter are these same-run ratios.

Raft and etcd writers talk to the leader (found through their status RPCs, as a client
that follows the leader hint would), so that the measurement is of replication, not
forwarding (``--raft-writes-to follower`` measures forwarding too); readers are spread
over all nodes, which all serve linearizable reads
(followers through ReadIndex, etcd's too). Gossip clients are spread over all nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from caplab import errors
from caplab.client import CHANNEL_OPTIONS
from caplab.pipeline_client import Pipeline
from caplab.v1 import kv_pb2, kv_pb2_grpc
from harness.cluster import LocalCluster, free_ports

SCHEMA_VERSION = 2
PATHS = ("unary", "pipelined")

# One client operation: (caller index, key, value, sequence) -> awaitable
Op = Callable[[int, str, bytes, int], Awaitable[object]]


@dataclass(frozen=True)
class Cell:
    target: str  # "noop" | "etcd" | store name, "-insecure" with plaintext peer links
    path: str  # "unary" | "pipelined"
    op: str  # "write" | "read"
    concurrency: int
    ops: int
    errors: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Target:
    """Something to measure: its name and path, and how it writes and reads."""

    name: str
    path: str
    endpoints: dict[str, list[str]]  # op -> endpoints its callers are spread over
    connect: Callable[[list[grpc.aio.Channel], str], Op]  # (channels, op) -> the op


# -- the client side of each target ---------------------------------------------------
def _caplab(path: str, request_ids: bool) -> Callable[[list[grpc.aio.Channel], str], Op]:
    """caplab's Put and Get over ``path``: unary RPCs, or KV.Pipeline (one per channel)."""

    def connect(channels: list[grpc.aio.Channel], op: str) -> Op:
        if path == "unary":
            stubs = [kv_pb2_grpc.KVStub(ch) for ch in channels]

            def send(i: int, kind: str, req: Any) -> Awaitable[object]:
                stub = stubs[i % len(stubs)]
                call: Awaitable[object] = (stub.Put if kind == "put" else stub.Get)(req, timeout=10)
                return call

        else:
            pipes = [Pipeline(ch) for ch in channels]

            def send(i: int, kind: str, req: Any) -> Awaitable[object]:
                return pipes[i % len(pipes)].call(kind, req, 10)

        cid = f"bench-{os.getpid()}-{time.monotonic_ns()}"

        def write(i: int, key: str, value: bytes, seq: int) -> Awaitable[object]:
            rid = kv_pb2.RequestId(client_id=f"{cid}-{i}", sequence=seq) if request_ids else None
            return send(i, "put", kv_pb2.PutRequest(key=key, value=value, request_id=rid))

        def read(i: int, key: str, value: bytes, seq: int) -> Awaitable[object]:
            return send(i, "get", kv_pb2.GetRequest(key=key))

        return write if op == "write" else read

    return connect


def _etcd(channels: list[grpc.aio.Channel], op: str) -> Op:
    from harness.etcd.cluster import etcd_put, etcd_range, kv_stub

    stubs = [kv_stub(ch) for ch in channels]

    def write(i: int, key: str, value: bytes, seq: int) -> Awaitable[object]:
        return etcd_put(stubs[i % len(stubs)], key.encode(), value, 10)

    def read(i: int, key: str, value: bytes, seq: int) -> Awaitable[object]:
        return etcd_range(stubs[i % len(stubs)], key.encode(), 10)

    return write if op == "write" else read


# -- one cell ---------------------------------------------------------------------------
async def _drive(
    target: Target, op: str, concurrency: int, duration: float, warmup: float, value: bytes
) -> tuple[int, int, HdrHistogram]:
    channels = [
        grpc.aio.insecure_channel(ep, options=CHANNEL_OPTIONS) for ep in target.endpoints[op]
    ]
    call = target.connect(channels, op)
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    counts = {"ok": 0, "err": 0}
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def client(i: int) -> None:
        seq = 0
        keys = [f"bench/{i}/{k}" for k in range(16)]
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            seq += 1
            t0 = time.perf_counter_ns()
            try:
                await call(i, keys[seq % len(keys)], value, seq)
                ok = True
            except (grpc.aio.AioRpcError, errors.StoreError):
                ok = False
            t1 = time.perf_counter_ns()
            if time.monotonic() >= measure_from:
                if ok:
                    counts["ok"] += 1
                    hist.record_value(max(1, (t1 - t0) // 1000))
                else:
                    counts["err"] += 1

    try:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    finally:
        for ch in channels:
            await ch.close()
    return counts["ok"], counts["err"], hist


async def _cell(target: Target, op: str, conc: int, args: argparse.Namespace, value: bytes) -> Cell:
    ok, err, h = await _drive(target, op, conc, args.duration, args.warmup, value)
    secs = args.duration
    cell = Cell(
        target.name,
        target.path,
        op,
        conc,
        ok,
        err,
        secs,
        ok / secs,
        h.get_value_at_percentile(50) / 1000 if ok else float("nan"),
        h.get_value_at_percentile(99) / 1000 if ok else float("nan"),
    )
    print(
        f"  {target.name:15s} {target.path:9s} {op:5s} c={conc:<4d} {cell.ops_per_s:9.0f} ops/s"
        f"  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  errors {err}",
        file=sys.stderr,
        flush=True,
    )
    return cell


async def _prefill(target: Target, value: bytes, concurrency: int) -> None:
    """Write every key the read phase will read, so that reads return real values."""
    channels = [grpc.aio.insecure_channel(target.endpoints["write"][0], options=CHANNEL_OPTIONS)]
    write = target.connect(channels, "write")
    try:
        for i in range(concurrency):
            await asyncio.gather(*(write(i, f"bench/{i}/{k}", value, k + 1) for k in range(16)))
    finally:
        await channels[0].close()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _leader_endpoint(cluster: LocalCluster, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    eps = cluster.endpoints
    while time.monotonic() < deadline:
        for ep in eps.values():
            try:
                async with grpc.aio.insecure_channel(ep) as ch:
                    st = await kv_pb2_grpc.ClusterStub(ch).Status(kv_pb2.StatusRequest(), timeout=1)
                if st.leader_id and st.leader_id in eps:
                    async with grpc.aio.insecure_channel(eps[st.leader_id]) as ch:
                        await kv_pb2_grpc.KVStub(ch).Put(
                            kv_pb2.PutRequest(key="bench/ready", value=b"1"), timeout=5
                        )
                    return eps[st.leader_id]
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.1)
    raise TimeoutError("no raft leader elected within 30 s")


async def _forwarded(endpoint: str) -> int:
    """Requests the node at ``endpoint`` has forwarded to its leader."""
    async with grpc.aio.insecure_channel(endpoint) as ch:
        st = await kv_pb2_grpc.ClusterStub(ch).Status(kv_pb2.StatusRequest(), timeout=5)
    return int(st.counters["forwarded"])


def _machine() -> dict[str, Any]:
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "grpc": grpc.__version__,
        "commit": commit,
    }


# -- the run ----------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _noop_server() -> AsyncIterator[str]:
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.noop_server", "--listen", f"127.0.0.1:{port}"]
    )
    ep = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                async with grpc.aio.insecure_channel(ep) as ch:
                    await kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key="x"), timeout=1)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        yield ep
    finally:
        proc.terminate()
        proc.wait()


@contextlib.asynccontextmanager
async def _etcd_cluster(root: Path) -> AsyncIterator[tuple[dict[str, list[str]], list[int]]]:
    from harness.etcd.cluster import EtcdCluster

    with EtcdCluster(root / "etcd") as etcd:
        await etcd.wait_ready()
        leader = await etcd.leader_endpoint()
        yield {"write": [leader], "read": etcd.endpoints}, etcd.pids


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    value = os.urandom(args.value_size // 2 + 1).hex()[: args.value_size].encode()
    conc = [int(c) for c in args.concurrency.split(",")]
    stores = args.store.split(",")
    paths = args.path.split(",")
    cells: list[Cell] = []
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="caplab-bench-"))
    extra = [f"--set={s}" for s in args.set]
    idle_cpu = idle_wall = 0.0
    forwarded: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        noop_ep = await stack.enter_async_context(_noop_server())
        noop = {"write": [noop_ep], "read": [noop_ep]}
        etcd: Target | None = None
        etcd_pids: list[int] = []
        if args.compare == "etcd":
            etcd_eps, etcd_pids = await stack.enter_async_context(_etcd_cluster(root))
            etcd = Target("etcd", "unary", etcd_eps, _etcd)
        modes = {"tls": [True], "insecure": [False], "both": [True, False]}[args.security]
        for store in stores:
            for secure in modes:
                target = store if secure else f"{store}-insecure"
                with LocalCluster(
                    store, args.nodes, root / target, extra_args=extra, secure=secure
                ) as cluster:
                    cluster.start()
                    await cluster.wait_ready()
                    every = list(cluster.endpoints.values())
                    writers = every
                    if store == "raft":
                        leader = await _leader_endpoint(cluster)
                        writers = [leader]
                        if args.raft_writes_to == "follower":  # (it forwards to the leader)
                            writers = [next(ep for ep in every if ep != leader)]
                    eps = {"write": writers, "read": every}
                    pids = [n.proc.pid for n in cluster.nodes.values() if n.proc is not None]
                    peers = "mutual TLS between nodes" if secure else "plaintext between nodes"
                    print(
                        f"{store}, {args.nodes} nodes, {peers}, beside the raw grpc.aio no-op "
                        f"server{' and etcd' if etcd else ''}:",
                        file=sys.stderr,
                    )
                    for op in ("write", "read"):
                        if op == "read":
                            await _prefill(
                                Target(store, "unary", eps, _caplab("unary", False)),
                                value,
                                max(conc),
                            )
                            if etcd is not None and store == stores[0] and secure == modes[0]:
                                await _prefill(etcd, value, max(conc))
                        for n in conc:
                            for path in paths:
                                # The no-op cells also measure the idle clusters' own CPU
                                # (timers, heartbeats), reported beside the figures.
                                cpu0, wall0 = cpu_seconds(pids + etcd_pids), time.monotonic()
                                cells.append(
                                    await _cell(
                                        Target("noop", path, noop, _caplab(path, args.request_ids)),
                                        op,
                                        n,
                                        args,
                                        value,
                                    )
                                )
                                idle_cpu += cpu_seconds(pids + etcd_pids) - cpu0
                                idle_wall += time.monotonic() - wall0
                                if etcd is not None and path == paths[0]:
                                    cells.append(await _cell(etcd, op, n, args, value))
                                store_target = Target(
                                    target, path, eps, _caplab(path, args.request_ids)
                                )
                                cells.append(await _cell(store_target, op, n, args, value))
                    if store == "raft":  # (writes a follower forwarded: 0 to the leader)
                        forwarded[target] = await _forwarded(writers[0])
    return {
        "schema_version": SCHEMA_VERSION,
        "stores": stores,
        "nodes": args.nodes,
        "value_size": args.value_size,
        "request_ids": args.request_ids,
        "duration_s": args.duration,
        "paths": paths,
        "compare": args.compare,
        "peer_security": args.security,
        "raft_writes_to": args.raft_writes_to,
        "raft_forwarded": forwarded,  # per raft pass: writes its writers' node forwarded
        "machine": _machine(),
        # CPU the idle clusters used while the no-op server was measured (one core = 1.0)
        "idle_cpu_during_noop": idle_cpu / idle_wall if idle_wall else 0.0,
        "cells": [asdict(c) for c in cells],
        "ratios": ratios([Cell(**asdict(c)) for c in cells]),
    }


def ratios(cells: list[Cell]) -> dict[str, dict[str, float]]:
    """Same-run ratios, keyed "target/path/op@concurrency":

    - ``of_noop``: a store cell over the no-op cell of the same path, op and concurrency
      measured right before it;
    - ``of_etcd``: a store cell over the etcd cell of the same op and concurrency (of the
      same store's pass);
    - ``gossip_over_raft``: gossip over raft, same security, path, op and concurrency.
    """
    of_noop: dict[str, float] = {}
    of_etcd: dict[str, float] = {}
    noop: Cell | None = None
    etcd: dict[tuple[str, int], Cell] = {}
    by_key: dict[str, Cell] = {}
    for c in cells:
        if c.target == "noop":
            noop = c
            continue
        if c.target == "etcd":
            etcd[(c.op, c.concurrency)] = c
            continue
        key = f"{c.target}/{c.path}/{c.op}@{c.concurrency}"
        by_key[key] = c
        if noop is not None and (noop.path, noop.op, noop.concurrency) == (
            c.path,
            c.op,
            c.concurrency,
        ):
            of_noop[key] = c.ops_per_s / noop.ops_per_s if noop.ops_per_s else 0.0
        e = etcd.get((c.op, c.concurrency))
        if e is not None:
            of_etcd[key] = c.ops_per_s / e.ops_per_s if e.ops_per_s else 0.0
    gossip_over_raft: dict[str, float] = {}
    for key, c in by_key.items():
        if c.target.startswith("gossip"):
            raft = by_key.get(key.replace("gossip", "raft", 1))
            if raft is not None and raft.ops_per_s:
                gossip_over_raft[key] = c.ops_per_s / raft.ops_per_s
    return {"of_noop": of_noop, "of_etcd": of_etcd, "gossip_over_raft": gossip_over_raft}


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result["ratios"]
    title = f"caplab bench: {', '.join(result['stores'])} ({result['nodes']} nodes)"
    title += " beside a raw grpc.aio no-op server" + (
        " and etcd" if result["compare"] == "etcd" else ""
    )
    if result.get("raft_writes_to") == "follower" and "raft" in result["stores"]:
        title += "; raft writes through a follower"
    t = Table(title=title)
    cols = ["target", "path", "op", "callers", "ops/s", "p50 ms", "p99 ms", "errors"]
    cols += ["of no-op"]
    if result["compare"] == "etcd":
        cols.append("of etcd")
    if r["gossip_over_raft"]:
        cols.append("gossip/raft")
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for c in result["cells"]:
        key = f"{c['target']}/{c['path']}/{c['op']}@{c['concurrency']}"
        row = [
            c["target"],
            c["path"],
            c["op"],
            str(c["concurrency"]),
            f"{c['ops_per_s']:.0f}",
            f"{c['p50_ms']:.2f}",
            f"{c['p99_ms']:.2f}",
            str(c["errors"]),
            _pct(r["of_noop"].get(key)),
        ]
        if result["compare"] == "etcd":
            row.append(_pct(r["of_etcd"].get(key)))
        if r["gossip_over_raft"]:
            g = r["gossip_over_raft"].get(key)
            row.append(f"{g:.2f}x" if g is not None else "")
        t.add_row(*row)
    Console().print(t)


def _pct(frac: float | None) -> str:
    return "" if frac is None else f"{100 * frac:.0f}%"


def add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="throughput/latency of the stores beside a raw gRPC server (and etcd)"
    )
    p.add_argument(
        "--store", default="raft", help="raft, gossip, or both in turn: raft,gossip (default raft)"
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    p.add_argument(
        "--path",
        default="unary,pipelined",
        help="client paths: unary RPCs, KV.Pipeline (pipelined), or both (the default)",
    )
    p.add_argument(
        "--compare",
        choices=["etcd"],
        default=None,
        help="also measure a 3-member etcd cluster on loopback (needs the etcd binary)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument(
        "--security",
        choices=["both", "tls", "insecure"],
        default="both",
        help="peer links of the measured cluster: mutual TLS (the default of every cluster), "
        "plaintext (--insecure), or both, one after the other in the same run",
    )
    p.add_argument(
        "--raft-writes-to",
        choices=["leader", "follower"],
        default="leader",
        help="where raft's writers send: the leader (the default: replication alone), or a "
        "follower, which forwards every write to the leader over one KV.Pipeline",
    )
    p.add_argument(
        "--no-request-ids",
        dest="request_ids",
        action="store_false",
        help="writes without a request id (no exactly-once: measures what it costs)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="store tuning passed to every node",
    )
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from caplab.cli import UsageError

    try:
        conc = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise UsageError("--concurrency takes comma-separated integers, e.g. 1,16,64") from None
    if not conc or min(conc) < 1 or max(conc) > 1024:
        raise UsageError("--concurrency values must be between 1 and 1024")
    if not 1 <= args.value_size <= 1024 * 1024:
        raise UsageError("--value-size must be between 1 and 1048576")
    stores = args.store.split(",")
    if (
        not stores
        or any(s not in ("raft", "gossip") for s in stores)
        or len(set(stores)) < len(stores)
    ):
        raise UsageError("--store takes raft, gossip or raft,gossip")
    paths = args.path.split(",")
    if not paths or any(p not in PATHS for p in paths) or len(set(paths)) < len(paths):
        raise UsageError("--path takes unary, pipelined or unary,pipelined")
    if args.compare == "etcd":
        from harness.etcd.cluster import INSTALL_HINT, etcd_binary

        if etcd_binary() is None:
            raise UsageError(INSTALL_HINT)
    # SIGTERM unwinds like Ctrl-C, so that every cluster (etcd's too) is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = asyncio.run(run_bench(args))
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


REGISTRARS = [add_bench]
