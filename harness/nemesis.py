"""Fault injection: partition shapes over a :class:`~harness.proxy.ProxyNet`, and process
faults (kill/restart, pause/resume, clock skew) over a :class:`~harness.cluster.LocalCluster`.

Theory of operation
-------------------
A partition is described by *reachability*: ``reach[a]`` is the set of nodes ``a`` can
exchange messages with (always including ``a``). Reachability need not be transitive (the
bridge node and the majorities ring are the point of those shapes), so a partition is not
just a list of groups. The directed links that get cut are ``{(a, b) : b not in reach[a]}``;
all shapes here are symmetric (both a->b and b->a are cut). One-way cuts are available
directly on the :class:`~harness.proxy.ProxyNet`.

A node is on the ``majority`` side when it reaches a strict majority of the cluster
(itself included), else on the ``minority`` side. Reports split availability by that tag.

Shape functions are pure (nodes and a ``random.Random`` in, :class:`Partition` out) and are
tested on their own. :class:`Nemesis` applies them and the process faults, keeps the current
partition (so workloads can tag operations with their side) and returns, for every action,
a JSON-able description for the history (``process: "nemesis"``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from caplab import errors
from caplab.client import KVClient
from harness.cluster import LocalCluster
from harness.proxy import LinkMode, ProxyNet

SHAPES = (
    "groups",
    "majority-minority",
    "random-halves",
    "isolate",
    "isolate-leader",
    "bridge",
    "majorities-ring",
)
MAJORITY, MINORITY = "majority", "minority"


@dataclass(frozen=True, slots=True)
class Partition:
    """A partition of ``nodes``: ``reach[a]`` = nodes ``a`` can talk to (``a`` included)."""

    shape: str
    nodes: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]  # human description (may overlap: bridge, ring)
    reach: Mapping[str, frozenset[str]]

    @property
    def blocked(self) -> frozenset[tuple[str, str]]:
        """Directed links cut by this partition."""
        return frozenset(
            (a, b) for a in self.nodes for b in self.nodes if a != b and b not in self.reach[a]
        )

    def side(self, node: str) -> str:
        """``majority`` if ``node`` reaches a strict majority of the cluster, else ``minority``."""
        return MAJORITY if 2 * len(self.reach[node]) > len(self.nodes) else MINORITY

    def sides(self) -> dict[str, str]:
        return {n: self.side(n) for n in self.nodes}

    def describe(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "groups": [list(g) for g in self.groups],
            "sides": self.sides(),
            "blocked": [f"{a}->{b}" for a, b in sorted(self.blocked)],
        }


def _check_nodes(nodes: Sequence[str]) -> tuple[str, ...]:
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"duplicate node ids in {list(nodes)}")
    if len(nodes) < 2:
        raise ValueError("a partition needs at least 2 nodes")
    return tuple(nodes)


def from_groups(
    nodes: Sequence[str], groups: Sequence[Iterable[str]], shape: str = "groups"
) -> Partition:
    """Disjoint groups; nodes talk iff they are in the same group. Nodes listed in no group
    form one more group together."""
    all_nodes = _check_nodes(nodes)
    seen: set[str] = set()
    gs: list[tuple[str, ...]] = []
    for g in groups:
        members = tuple(g)
        for n in members:
            if n not in all_nodes:
                raise ValueError(f"unknown node {n!r}; nodes are {', '.join(all_nodes)}")
            if n in seen:
                raise ValueError(f"node {n!r} is in more than one group")
            seen.add(n)
        if members:
            gs.append(members)
    rest = tuple(n for n in all_nodes if n not in seen)
    if rest:
        gs.append(rest)
    reach = {n: frozenset(g) for g in gs for n in g}
    return Partition(shape, all_nodes, tuple(gs), reach)


def random_halves(nodes: Sequence[str], rng: random.Random) -> Partition:
    """Shuffle and cut in two: ``floor(n/2)`` and ``ceil(n/2)`` nodes."""
    shuffled = list(_check_nodes(nodes))
    rng.shuffle(shuffled)
    k = len(shuffled) // 2
    return from_groups(nodes, [sorted(shuffled[:k]), sorted(shuffled[k:])], "random-halves")


def majority_minority(nodes: Sequence[str], rng: random.Random) -> Partition:
    """A random minority of ``floor((n-1)/2)`` nodes cut from the majority (with 4 nodes: 1|3)."""
    shuffled = list(_check_nodes(nodes))
    rng.shuffle(shuffled)
    k = (len(shuffled) - 1) // 2
    if k == 0:
        raise ValueError("majority-minority needs at least 3 nodes")
    return from_groups(nodes, [sorted(shuffled[k:]), sorted(shuffled[:k])], "majority-minority")


def isolate(nodes: Sequence[str], node: str, shape: str = "isolate") -> Partition:
    """``node`` alone against the rest."""
    if node not in nodes:
        raise ValueError(f"unknown node {node!r}; nodes are {', '.join(nodes)}")
    return from_groups(nodes, [[n for n in nodes if n != node], [node]], shape)


def bridge(nodes: Sequence[str], rng: random.Random) -> Partition:
    """Two halves that cannot talk, plus one bridge node that talks to both."""
    shuffled = list(_check_nodes(nodes))
    if len(shuffled) < 3:
        raise ValueError("bridge needs at least 3 nodes")
    rng.shuffle(shuffled)
    b, rest = shuffled[0], shuffled[1:]
    k = len(rest) // 2
    a_side, b_side = sorted(rest[:k]), sorted(rest[k:])
    reach: dict[str, frozenset[str]] = {b: frozenset(shuffled)}
    for n in a_side:
        reach[n] = frozenset([*a_side, b])
    for n in b_side:
        reach[n] = frozenset([*b_side, b])
    groups = (tuple([*a_side, b]), tuple([b, *b_side]))
    return Partition("bridge", tuple(nodes), groups, reach)


def majorities_ring(nodes: Sequence[str], rng: random.Random) -> Partition:
    """Nodes on a (shuffled) ring each see their nearest neighbours on both sides, enough to
    form a majority with themselves; no two nodes see the same majority. Needs >= 4 nodes."""
    ring = list(_check_nodes(nodes))
    n = len(ring)
    if n < 4:
        raise ValueError("majorities-ring needs at least 4 nodes")
    rng.shuffle(ring)
    majority = n // 2 + 1
    k = majority // 2  # neighbours on each side: 2k+1 >= majority
    reach = {ring[i]: frozenset(ring[(i + d) % n] for d in range(-k, k + 1)) for i in range(n)}
    groups = tuple(tuple(ring[(i + d) % n] for d in range(-k, k + 1)) for i in range(n))
    return Partition("majorities-ring", tuple(nodes), groups, reach)


def make_partition(
    shape: str,
    nodes: Sequence[str],
    rng: random.Random,
    *,
    groups: Sequence[Sequence[str]] | None = None,
    node: str | None = None,
) -> Partition:
    """Dispatch on ``shape`` (see :data:`SHAPES`); ``node`` for isolate/isolate-leader."""
    if shape == "groups":
        if not groups:
            raise ValueError("partition 'groups' needs groups")
        return from_groups(nodes, groups)
    if shape == "majority-minority":
        return majority_minority(nodes, rng)
    if shape == "random-halves":
        return random_halves(nodes, rng)
    if shape in ("isolate", "isolate-leader"):
        return isolate(nodes, node if node is not None else rng.choice(list(nodes)), shape)
    if shape == "bridge":
        return bridge(nodes, rng)
    if shape == "majorities-ring":
        return majorities_ring(nodes, rng)
    raise ValueError(f"unknown partition shape {shape!r}; allowed: {', '.join(SHAPES)}")


class Nemesis:
    """Applies faults to one cluster. Every action returns a JSON-able description.

    Targets (``resolve``): a node id, ``leader`` (raft: the current leader, asked through
    ``Cluster.Status``; gossip has none: a random node), ``minority`` (nodes on the minority
    side of the current partition), ``majority``, ``random``, ``all``, ``killed``,
    ``paused``, ``skewed``.
    """

    def __init__(
        self,
        cluster: LocalCluster,
        net: ProxyNet,
        rng: random.Random,
        *,
        mode: LinkMode = LinkMode.DROP,
        status_timeout: float = 1.0,
    ) -> None:
        self.cluster = cluster
        self.net = net
        self.rng = rng
        self.mode = mode
        self.nodes = list(cluster.nodes)
        self.current: Partition | None = None
        self.killed: set[str] = set()
        self.paused: set[str] = set()
        self.skews: dict[str, int] = {}
        self._client = KVClient(list(cluster.endpoints.values()), timeout=status_timeout)

    # -- state --------------------------------------------------------------
    def side_of(self, node: str) -> str | None:
        """The node's side in the current partition, None when there is none."""
        return self.current.side(node) if self.current is not None else None

    async def leader(self) -> tuple[str | None, dict[str, Any]]:
        """The leader most recently elected as seen by the nodes that answer (raft), with the
        answers: a node counts as leader if it says so itself, highest term wins."""
        eps = self.cluster.endpoints
        alive = [n for n in self.nodes if n not in self.killed and n not in self.paused]

        async def ask(n: str) -> tuple[str, Any]:
            try:
                return n, await self._client.status(endpoint=eps[n])
            except errors.StoreError:
                return n, None

        answers = await asyncio.gather(*(ask(n) for n in alive))
        best: tuple[int, str] | None = None
        seen: dict[str, Any] = {}
        for n, st in answers:
            if st is None:
                continue
            seen[n] = {"role": st.role, "term": st.term, "leader": st.leader_id}
            if st.role == "leader" and (best is None or st.term > best[0]):
                best = (st.term, n)
        if best is None:  # nobody claims it: the most common opinion of the followers
            votes: dict[str, int] = {}
            for info in seen.values():
                if info["leader"]:
                    votes[info["leader"]] = votes.get(info["leader"], 0) + 1
            if votes:
                return max(votes, key=lambda k: votes[k]), seen
            return None, seen
        return best[1], seen

    async def resolve(self, target: str) -> list[str]:
        """Node ids for a target (see the class docstring)."""
        if target in self.cluster.nodes:
            return [target]
        if target == "all":
            return list(self.nodes)
        if target == "random":
            return [self.rng.choice(self.nodes)]
        if target == "leader":
            leader, _ = await self.leader()
            return [leader] if leader else [self.rng.choice(self.nodes)]
        if target in (MINORITY, MAJORITY):
            if self.current is None:
                return []
            return [n for n in self.nodes if self.current.side(n) == target]
        if target == "killed":
            return sorted(self.killed)
        if target == "paused":
            return sorted(self.paused)
        if target == "skewed":
            return sorted(n for n, s in self.skews.items() if s)
        raise ValueError(f"unknown target {target!r}")

    # -- network ------------------------------------------------------------
    async def partition(
        self,
        shape: str,
        *,
        groups: Sequence[Sequence[str]] | None = None,
        target: str | None = None,
        mode: LinkMode | None = None,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
    ) -> dict[str, Any]:
        """Apply a partition shape (replacing any current one)."""
        node: str | None = None
        extra: dict[str, Any] = {}
        if shape == "isolate-leader" or (shape == "isolate" and target == "leader"):
            node, seen = await self.leader()
            extra["leader"] = node
            extra["status"] = seen
            if node is None:
                node = self.rng.choice(self.nodes)
                extra["note"] = "no leader known; isolated a random node"
        elif shape == "isolate" and target is not None:
            resolved = await self.resolve(target)
            node = resolved[0] if resolved else None
        p = make_partition(shape, self.nodes, self.rng, groups=groups, node=node)
        m = mode or self.mode
        self.net.apply(p.blocked, m, delay_ms, jitter_ms)
        self.current = p
        return {**p.describe(), "mode": m.value, **extra}

    async def heal(self) -> dict[str, Any]:
        """Every link passes again."""
        was = self.current.describe() if self.current is not None else None
        self.net.heal()
        self.current = None
        return {"healed": was["shape"] if was else None}

    # -- processes ----------------------------------------------------------
    async def kill(self, target: str) -> dict[str, Any]:
        """SIGKILL the target nodes."""
        nodes = [n for n in await self.resolve(target) if n not in self.killed]
        for n in nodes:
            self.cluster.nodes[n].kill()
            self.killed.add(n)
            self.paused.discard(n)
        return {"target": target, "nodes": nodes}

    async def restart(self, target: str = "killed") -> dict[str, Any]:
        """Start killed (or stopped) target nodes again with the same data; waits for health."""
        nodes = [n for n in await self.resolve(target) if not self.cluster.nodes[n].running]
        for n in nodes:
            self.cluster.nodes[n].start()
            self.killed.discard(n)
        self.net.reset_links_to(nodes)
        if nodes:
            await self.cluster.wait_ready(timeout=30.0, nodes=nodes)
        return {"target": target, "nodes": nodes}

    async def pause(self, target: str) -> dict[str, Any]:
        """SIGSTOP the target nodes."""
        nodes = [n for n in await self.resolve(target) if n not in self.killed]
        for n in nodes:
            self.cluster.nodes[n].pause()
            self.paused.add(n)
        return {"target": target, "nodes": nodes}

    async def resume(self, target: str = "paused") -> dict[str, Any]:
        """SIGCONT the target nodes."""
        nodes = [n for n in await self.resolve(target) if n in self.paused]
        for n in nodes:
            self.cluster.nodes[n].resume()
            self.paused.discard(n)
        return {"target": target, "nodes": nodes}

    async def clock_skew(self, target: str, skew_ms: int) -> dict[str, Any]:
        """Set the Admin clock skew of the target nodes (0 resets)."""
        nodes = await self.resolve(target)
        eps = self.cluster.endpoints
        applied: dict[str, int | str] = {}
        for n in nodes:
            try:
                applied[n] = await self._client.set_clock_skew(skew_ms, endpoint=eps[n])
                self.skews[n] = skew_ms
            except errors.StoreError as e:
                applied[n] = f"error: {e.code.name}: {e.message}"
        return {"target": target, "skew_ms": skew_ms, "nodes": applied}

    async def recover(self) -> list[tuple[str, dict[str, Any]]]:
        """Undo everything still in force: heal, resume, restart, reset skews."""
        done: list[tuple[str, dict[str, Any]]] = []
        if self.current is not None or self.net.blocked():
            done.append(("heal", await self.heal()))
        if self.paused:
            done.append(("resume", await self.resume("paused")))
        if self.killed:
            done.append(("restart", await self.restart("killed")))
        if any(self.skews.values()):
            done.append(("clock-skew", await self.clock_skew("skewed", 0)))
        return done

    async def close(self) -> None:
        await self._client.close()
