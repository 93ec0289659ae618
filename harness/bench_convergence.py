"""Convergence benchmark of the gossip store, and the cost of anti-entropy.

    .venv/bin/python -m harness.bench_convergence [--keys 10000] [--nodes 5] [--set NAME=VALUE]

Part 1 (real processes): ``--nodes`` nodes whose links go through TCP proxies, split
2|3; during the partition each side writes ``--keys`` keys (half of them also written by
the other side, so LWW conflicts are resolved on heal). The partition lasts until the
sides have declared each other dead. Then the links heal and Status is sampled on every
node every ~50 ms until all state digests are equal; the script prints the time that took
and the gossip / anti-entropy work done meanwhile (Status counters, summed over nodes).

Part 2 (in process, on the sans-IO core, like tests/gossip/test_core.py): bytes exchanged
by one anti-entropy session (rounds until the digests match, ``messages.wire_size``)
between two replicas of ``--ae-keys`` keys that are identical, or differ in 10 or 1,000
keys.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from caplab.client import KVClient
from caplab.v1 import kv_pb2
from gossip.core import GossipConfig, GossipCore
from gossip.crdt import Register, Value
from gossip.hlc import Timestamp
from gossip.messages import Message, wire_size
from harness.bench import cpu_seconds
from harness.cluster import LocalCluster, free_ports
from harness.proxy import LinkMode, ProxyNet

WORK_COUNTERS = (
    "deltas_sent",
    "delta_entries_sent",
    "ae_rounds_started",
    "anti_entropy_rounds",
    "ae_items_sent",
    "wire_bytes_sent",
    "messages_dropped",  # peer queues full or streams abandoned (then re-sent)
    "records_collected",
    "duplicates_merged",
)


async def _statuses(clients: dict[str, KVClient]) -> dict[str, kv_pb2.StatusResponse]:
    out = await asyncio.gather(*(c.status() for c in clients.values()))
    return dict(zip(clients, out, strict=True))


async def _write_side(
    endpoint: str, keys: list[str], tag: bytes, concurrency: int, request_ids: bool = True
) -> None:
    queue = list(keys)

    async def worker() -> None:
        # One client (client_id) per worker: sequences must increase per client_id. An
        # empty client_id opts out of exactly-once (no applied record per write).
        cid = None if request_ids else ""
        async with KVClient([endpoint], timeout=10.0, retries=3, client_id=cid) as client:
            while queue:
                k = queue.pop()
                await client.put(k, tag + k.encode())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _node_cpu_seconds(cluster: LocalCluster) -> float:
    """CPU time (user + system) the node processes used so far."""
    return cpu_seconds([n.proc.pid for n in cluster.nodes.values() if n.proc is not None])


async def convergence(args: argparse.Namespace, root: Path | None = None) -> dict[str, float]:
    """Part 1; node data and logs go to ``root`` (default: a new temporary directory)."""
    ids = [f"n{i + 1}" for i in range(args.nodes)]
    side_a, side_b = ids[:2], ids[2:]
    both = free_ports(2 * len(ids))
    ports, peer_ports = both[: len(ids)], both[len(ids) :]
    proxies = ProxyNet(dict(zip(ids, peer_ports, strict=True)))
    await proxies.start()
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="caplab-conv-"))
    cluster = LocalCluster(
        "gossip",
        len(ids),
        root,
        ports=ports,
        peer_ports=peer_ports,
        peer_addresses=proxies.peer_addresses,
        extra_args=[f"--set={s}" for s in args.set],
    )
    clients = {n: KVClient([ep], timeout=10.0, retries=3) for n, ep in cluster.endpoints.items()}
    try:
        cluster.start()
        await cluster.wait_ready()
        proxies.apply(
            [(a, b) for a in side_a for b in side_b] + [(b, a) for a in side_a for b in side_b],
            LinkMode.DROP,
        )
        half = args.keys // 2
        keys_a = [f"conv/{i:06d}" for i in range(args.keys)]
        keys_b = [f"conv/{i:06d}" for i in range(half, half + args.keys)]
        t0 = time.monotonic()
        await asyncio.gather(
            _write_side(
                cluster.endpoints[side_a[0]], keys_a, b"A:", args.concurrency, args.request_ids
            ),
            _write_side(
                cluster.endpoints[side_b[0]], keys_b, b"B:", args.concurrency, args.request_ids
            ),
        )
        write_s = time.monotonic() - t0
        print(
            f"partition {len(side_a)}|{len(side_b)}: wrote {args.keys} keys per side "
            f"({len(set(keys_a) | set(keys_b))} distinct) in {write_s:.1f} s",
            file=sys.stderr,
        )

        # Wait until each side converged internally and sees the other side as dead.
        deadline = time.monotonic() + 60
        while True:
            st = await _statuses(clients)
            inner = all(len({st[n].state_digest for n in side}) == 1 for side in (side_a, side_b))
            dead = all(
                m.state == kv_pb2.MEMBER_STATE_DEAD
                for n in ids
                for m in st[n].members
                if (n in side_a) != (m.node_id in side_a)
            )
            if inner and dead:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the sides did not settle within 60 s")
            await asyncio.sleep(0.05)
        before = st
        cpu0 = _node_cpu_seconds(cluster)
        proxies.heal()
        t_heal = time.monotonic()
        samples = 0
        while True:
            st = await _statuses(clients)
            samples += 1
            if len({s.state_digest for s in st.values()}) == 1:
                break
            if time.monotonic() - t_heal > 120:
                raise TimeoutError("no convergence within 120 s")
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t_heal
        cpu = _node_cpu_seconds(cluster) - cpu0
        work = {
            name: float(
                sum(st[n].counters.get(name, 0) - before[n].counters.get(name, 0) for n in ids)
            )
            for name in WORK_COUNTERS
        }
        keys = {st[n].keys for n in ids}
        print(
            f"converged {elapsed:.2f} s after heal ({samples} Status samples); keys per "
            f"replica {sorted(keys)}",
            file=sys.stderr,
        )
        return {"seconds": elapsed, "node_cpu_seconds": cpu, **work}
    finally:
        for c in clients.values():
            await c.close()
        cluster.close()
        await proxies.close()


# ---------------------------------------------------------------------------- anti-entropy

QUIET = GossipConfig(
    gossip_interval_ms=10**9,
    anti_entropy_interval_ms=10**9,
    ping_interval_ms=10**9,
    ping_timeout_ms=10**9 - 1,
)


def _exchange(a: GossipCore, b: GossipCore) -> tuple[int, int]:
    """One anti-entropy round a -> b, delivered reliably: (bytes, messages)."""
    a.start_anti_entropy(0, b.node_id)
    queue: list[Message] = list(a.take_outputs().messages)
    total = count = 0
    while queue:
        m = queue.pop(0)
        total += wire_size(m)
        count += 1
        dst = a if m.to == a.node_id else b
        dst.step(m, 0)
        queue += dst.take_outputs().messages
    return total, count


def ae_cost(n_keys: int, differing: int) -> tuple[int, int, int]:
    """(bytes, messages, rounds) until two replicas differing in ``differing`` keys match."""
    base: dict[str, Value] = {
        f"key-{i:06d}": Register(Timestamp(1000 + i, 0, "a"), b"value-%d" % i)
        for i in range(n_keys)
    }
    other = dict(base)
    for i in random.Random(differing).sample(range(n_keys), differing):
        other[f"key-{i:06d}"] = Register(Timestamp(10**7, i, "b"), b"new")
    a = GossipCore("a", ["a", "b"], QUIET, random.Random(1), state=base)
    b = GossipCore("b", ["a", "b"], QUIET, random.Random(2), state=other)
    total = msgs = rounds = 0
    while True:
        nbytes, n = _exchange(a, b)
        total, msgs, rounds = total + nbytes, msgs + n, rounds + 1
        if a.digest() == b.digest() or rounds >= 50:
            break
    assert a.digest() == b.digest(), "anti-entropy did not converge"
    return total, msgs, rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--keys", type=int, default=10_000, help="keys written on each side")
    p.add_argument("--concurrency", type=int, default=64, help="writers per side")
    p.add_argument("--ae-keys", type=int, default=100_000)
    p.add_argument("--skip-cluster", action="store_true", help="only the anti-entropy table")
    p.add_argument(
        "--no-request-ids",
        dest="request_ids",
        action="store_false",
        help="writers opt out of exactly-once (no applied record per write)",
    )
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    if not args.skip_cluster:
        r = asyncio.run(convergence(args))
        print(f"\nconvergence after heal, {args.nodes} nodes, {args.keys} keys per side")
        print(f"  {'time to identical digests':32s} {r['seconds']:10.2f} s   (target <= 2 s)")
        print(f"  {'node CPU meanwhile (all nodes)':32s} {r['node_cpu_seconds']:10.2f} s")
        for name in WORK_COUNTERS:
            print(f"  {name:32s} {r[name]:10.0f}")
    print(f"\nanti-entropy cost between two replicas of {args.ae_keys} keys (wire_size bytes)")
    print(f"  {'differing keys':>15s} {'bytes':>12s} {'messages':>9s} {'rounds':>7s}")
    for d in (0, 10, 1_000):
        nbytes, msgs, rounds = ae_cost(args.ae_keys, d)
        note = "   (target <= 1024)" if d == 0 else ""
        print(f"  {d:>15d} {nbytes:>12d} {msgs:>9d} {rounds:>7d}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
