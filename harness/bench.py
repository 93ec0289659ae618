"""`caplab bench`: throughput and latency of a store beside a raw grpc.aio no-op server.

For each target (the no-op server first, then a 3-node cluster of the store on
127.0.0.1, with mutual TLS between its nodes and then, with `--security both`, the
default, again with plaintext peer links, to show what authentication costs) and each
client concurrency, closed-loop clients issue writes (Put of `--value-size` bytes, each
client with its own client_id/sequence, so that every write goes through exactly-once
deduplication; `--no-request-ids` leaves it out, to measure what it costs) and then
reads (Get at the store's default consistency: linearizable on raft, local on gossip) for
`--duration` seconds after a warm-up. The no-op server is measured with the same
client code in the same run: it is the ceiling for any Python gRPC server here,
and the store's figures are reported as a fraction of it.

Raft writers talk to the leader (found through Cluster.Status, as a client that
follows the leader hint would), so that the measurement is of replication, not
forwarding; raft readers are spread over all nodes, which all serve linearizable
reads (followers through ReadIndex). Gossip clients are spread over all nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from caplab.client import CHANNEL_OPTIONS
from caplab.v1 import kv_pb2, kv_pb2_grpc
from harness.cluster import LocalCluster, free_ports


@dataclass(frozen=True)
class Cell:
    target: str  # "noop" | store name
    op: str  # "write" | "read"
    concurrency: int
    ops: int
    errors: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float


async def _drive(
    endpoints: list[str],
    op: str,
    concurrency: int,
    duration: float,
    warmup: float,
    value: bytes,
    request_ids: bool = True,
) -> tuple[int, int, float, HdrHistogram]:
    channels = [grpc.aio.insecure_channel(ep, options=CHANNEL_OPTIONS) for ep in endpoints]
    stubs = [kv_pb2_grpc.KVStub(ch) for ch in channels]
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    counts = {"ok": 0, "err": 0}
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration
    pid = os.getpid()

    async def client(i: int) -> None:
        stub = stubs[i % len(stubs)]
        client_id = f"bench-{pid}-{op}-{concurrency}-{i}"
        seq = 0
        keys = [f"bench/{i}/{k}" for k in range(16)]
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            seq += 1
            key = keys[seq % len(keys)]
            t0 = time.perf_counter_ns()
            try:
                if op == "write":
                    rid = (
                        kv_pb2.RequestId(client_id=client_id, sequence=seq) if request_ids else None
                    )
                    await stub.Put(
                        kv_pb2.PutRequest(key=key, value=value, request_id=rid), timeout=10
                    )
                else:
                    await stub.Get(kv_pb2.GetRequest(key=key), timeout=10)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            t1 = time.perf_counter_ns()
            if time.monotonic() >= measure_from:
                if ok:
                    counts["ok"] += 1
                    hist.record_value(max(1, (t1 - t0) // 1000))
                else:
                    counts["err"] += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    return counts["ok"], counts["err"], duration, hist


async def _prefill(endpoints: list[str], value: bytes, concurrency: int) -> None:
    """Write every key the read phase will read, so that reads return real values."""
    async with grpc.aio.insecure_channel(endpoints[0], options=CHANNEL_OPTIONS) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        for i in range(concurrency):
            await asyncio.gather(
                *(
                    stub.Put(kv_pb2.PutRequest(key=f"bench/{i}/{k}", value=value), timeout=10)
                    for k in range(16)
                )
            )


async def _cell(
    target: str, endpoints: list[str], op: str, conc: int, args: argparse.Namespace, value: bytes
) -> Cell:
    ok, err, secs, h = await _drive(
        endpoints, op, conc, args.duration, args.warmup, value, args.request_ids
    )
    cell = Cell(
        target,
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
        f"  {target:7s} {op:5s} c={conc:<3d} {cell.ops_per_s:9.0f} ops/s  "
        f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  errors {err}",
        file=sys.stderr,
        flush=True,
    )
    return cell


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


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    value = os.urandom(args.value_size // 2 + 1).hex()[: args.value_size].encode()
    conc = [int(c) for c in args.concurrency.split(",")]
    cells: list[Cell] = []
    port = free_ports(1)[0]
    noop = subprocess.Popen(
        [sys.executable, "-m", "harness.noop_server", "--listen", f"127.0.0.1:{port}"]
    )
    ep = f"127.0.0.1:{port}"
    root = Path(args.data_dir or tempfile.mkdtemp(prefix=f"caplab-bench-{args.store}-"))
    extra = [f"--set={s}" for s in args.set]
    idle_cpu = idle_wall = 0.0
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
        modes = {"tls": [True], "insecure": [False], "both": [True, False]}[args.security]
        for secure in modes:
            target = args.store if secure else f"{args.store}-insecure"
            with LocalCluster(
                args.store, args.nodes, root / target, extra_args=extra, secure=secure
            ) as cluster:
                cluster.start()
                await cluster.wait_ready()
                every = list(cluster.endpoints.values())
                if args.store == "raft":
                    endpoints = {"write": [await _leader_endpoint(cluster)], "read": every}
                else:
                    endpoints = {"write": every, "read": every}
                pids = [n.proc.pid for n in cluster.nodes.values() if n.proc is not None]
                # Each no-op cell runs right before the store's cell of the same op and
                # concurrency, so a machine whose speed drifts during the run (shared VMs
                # do) skews both alike. The idle cluster's own CPU during the no-op cells
                # (timers, heartbeats) is measured and reported.
                peers = "mutual TLS between nodes" if secure else "plaintext between nodes"
                print(
                    f"raw grpc.aio no-op server vs {args.store}, {args.nodes} nodes, {peers}:",
                    file=sys.stderr,
                )
                for op in ("write", "read"):
                    if op == "read":
                        await _prefill(endpoints["write"], value, max(conc))
                    for n in conc:
                        cpu0, wall0 = cpu_seconds(pids), time.monotonic()
                        cells.append(await _cell("noop", [ep], op, n, args, value))
                        idle_cpu += cpu_seconds(pids) - cpu0
                        idle_wall += time.monotonic() - wall0
                        cells.append(await _cell(target, endpoints[op], op, n, args, value))
    finally:
        noop.terminate()
        noop.wait()
    ratios: dict[str, float] = {}
    insecure: dict[str, float] = {}
    base: Cell | None = None
    for c in cells:  # each store cell follows its no-op cell
        if c.target == "noop":
            base = c
            continue
        assert base is not None and (base.op, base.concurrency) == (c.op, c.concurrency)
        frac = c.ops_per_s / base.ops_per_s if base.ops_per_s else 0
        (ratios if c.target == args.store else insecure)[f"{c.op}@{c.concurrency}"] = frac
    return {
        "schema_version": 1,
        "store": args.store,
        "nodes": args.nodes,
        "value_size": args.value_size,
        "request_ids": args.request_ids,
        "duration_s": args.duration,
        "machine": _machine(),
        # CPU the idle cluster used while the no-op server was measured (one core = 1.0)
        "cluster_idle_cpu_during_noop": idle_cpu / idle_wall if idle_wall else 0.0,
        "cells": [asdict(c) for c in cells],
        "fraction_of_noop": ratios,
        # the same cluster with plaintext peer links (--insecure), measured in the same run:
        # what authenticating the nodes to each other costs
        "fraction_of_noop_insecure": insecure,
        "peer_security": args.security,
    }


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"caplab bench: {result['store']} ({result['nodes']} nodes) vs raw grpc.aio")
    for col in ("target", "op", "concurrency", "ops/s", "p50 ms", "p99 ms", "errors", "% of no-op"):
        t.add_column(col, justify="right", no_wrap=True, min_width=15 if col == "target" else None)
    for c in result["cells"]:
        fracs = result[
            "fraction_of_noop" if "insecure" not in c["target"] else "fraction_of_noop_insecure"
        ]
        frac = fracs.get(f"{c['op']}@{c['concurrency']}")
        pct = f"{100 * frac:.0f}%" if c["target"] != "noop" and frac is not None else ""
        t.add_row(
            c["target"],
            c["op"],
            str(c["concurrency"]),
            f"{c['ops_per_s']:.0f}",
            f"{c['p50_ms']:.2f}",
            f"{c['p99_ms']:.2f}",
            str(c["errors"]),
            pct,
        )
    Console().print(t)


def add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="throughput/latency of a store beside a raw gRPC server")
    p.add_argument("--store", choices=["raft", "gossip"], required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
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
    result = asyncio.run(run_bench(args))
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


REGISTRARS = [add_bench]
