"""Partition shapes (pure functions) and the Nemesis applying them to a ProxyNet."""

from __future__ import annotations

import asyncio
import random
from itertools import combinations
from pathlib import Path

import pytest

from harness.cluster import LocalCluster
from harness.nemesis import (
    MAJORITY,
    MINORITY,
    Nemesis,
    Partition,
    bridge,
    from_groups,
    isolate,
    majorities_ring,
    majority_minority,
    make_partition,
    random_halves,
)
from harness.proxy import LinkMode, ProxyNet

N5 = ["n1", "n2", "n3", "n4", "n5"]


def _symmetric(p: Partition) -> None:
    for a, b in p.blocked:
        assert (b, a) in p.blocked
    for n in p.nodes:
        assert n in p.reach[n]


def test_groups_cut_exactly_the_links_between_groups() -> None:
    p = from_groups(N5, [["n1", "n2"], ["n3", "n4", "n5"]])
    assert p.blocked == {(a, b) for a in ("n1", "n2") for b in ("n3", "n4", "n5")} | {
        (b, a) for a in ("n1", "n2") for b in ("n3", "n4", "n5")
    }
    assert p.sides() == {
        "n1": MINORITY,
        "n2": MINORITY,
        "n3": MAJORITY,
        "n4": MAJORITY,
        "n5": MAJORITY,
    }
    _symmetric(p)


def test_unlisted_nodes_form_one_more_group() -> None:
    p = from_groups(N5, [["n1"], ["n2"]])
    assert p.groups == (("n1",), ("n2",), ("n3", "n4", "n5"))
    assert p.reach["n4"] == {"n3", "n4", "n5"}


def test_groups_refuse_unknown_and_duplicate_nodes() -> None:
    with pytest.raises(ValueError, match="unknown node 'n9'"):
        from_groups(N5, [["n9"]])
    with pytest.raises(ValueError, match="more than one group"):
        from_groups(N5, [["n1"], ["n1", "n2"]])


@pytest.mark.parametrize("seed", range(5))
def test_random_halves_split_floor_and_ceil(seed: int) -> None:
    p = random_halves(N5, random.Random(seed))
    sizes = sorted(len(g) for g in p.groups)
    assert sizes == [2, 3]
    assert sorted(n for g in p.groups for n in g) == N5
    assert sum(1 for s in p.sides().values() if s == MAJORITY) == 3
    even = random_halves(N5[:4], random.Random(seed))
    assert sorted(len(g) for g in even.groups) == [2, 2]
    assert set(even.sides().values()) == {MINORITY}  # 2 of 4 is no majority


def test_random_halves_is_deterministic_per_seed() -> None:
    assert random_halves(N5, random.Random(7)) == random_halves(N5, random.Random(7))
    shapes = {random_halves(N5, random.Random(s)).groups for s in range(20)}
    assert len(shapes) > 1


def test_majority_minority_sizes() -> None:
    for nodes, minority in ((N5, 2), (N5[:4], 1), (N5[:3], 1)):
        p = majority_minority(nodes, random.Random(1))
        sides = p.sides()
        assert sum(1 for s in sides.values() if s == MINORITY) == minority
        assert sum(1 for s in sides.values() if s == MAJORITY) == len(nodes) - minority
    with pytest.raises(ValueError):
        majority_minority(["n1", "n2"], random.Random(1))


def test_isolate_one_node() -> None:
    p = isolate(N5, "n3")
    assert p.reach["n3"] == {"n3"}
    assert {b for a, b in p.blocked if a == "n3"} == {"n1", "n2", "n4", "n5"}
    assert len(p.blocked) == 8
    assert p.side("n3") == MINORITY and p.side("n1") == MAJORITY


@pytest.mark.parametrize("seed", range(5))
def test_bridge_node_sees_both_halves_which_do_not_see_each_other(seed: int) -> None:
    p = bridge(N5, random.Random(seed))
    bridges = [n for n in N5 if p.reach[n] == set(N5)]
    assert len(bridges) == 1
    b = bridges[0]
    others = [n for n in N5 if n != b]
    halves = {p.reach[n] - {b} for n in others}
    assert len(halves) == 2
    h1, h2 = halves
    assert not h1 & h2 and len(h1) == len(h2) == 2
    assert all((x, y) in p.blocked for x in h1 for y in h2)
    assert not any(b in pair for pair in p.blocked)
    assert set(p.sides().values()) == {MAJORITY}  # half + bridge = 3 of 5
    _symmetric(p)


@pytest.mark.parametrize("seed", range(5))
def test_majorities_ring_every_node_sees_a_different_majority(seed: int) -> None:
    p = majorities_ring(N5, random.Random(seed))
    assert all(len(p.reach[n]) == 3 for n in N5)
    assert len({p.reach[n] for n in N5}) == 5
    assert set(p.sides().values()) == {MAJORITY}
    # not transitive: some pair talks through a common neighbour only
    assert any(b not in p.reach[a] and p.reach[a] & p.reach[b] for a, b in combinations(N5, 2))
    _symmetric(p)
    seven = majorities_ring([f"n{i}" for i in range(1, 8)], random.Random(seed))
    assert all(len(r) == 5 for r in seven.reach.values())
    with pytest.raises(ValueError, match="at least 4"):
        majorities_ring(N5[:3], random.Random(seed))


def test_make_partition_dispatch_and_unknown_shape() -> None:
    rng = random.Random(0)
    assert make_partition("isolate", N5, rng, node="n2").reach["n2"] == {"n2"}
    assert make_partition("groups", N5, rng, groups=[["n1"]]).reach["n1"] == {"n1"}
    with pytest.raises(ValueError, match="allowed: groups, majority-minority"):
        make_partition("halves", N5, rng)


async def test_nemesis_applies_partitions_to_the_proxy_net(tmp_path: Path) -> None:
    servers = [await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0) for _ in range(3)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    net = ProxyNet(dict(zip(["n1", "n2", "n3"], ports, strict=True)))
    await net.start()
    cluster = LocalCluster("raft", 3, tmp_path, ports=ports, peer_addresses=net.peer_addresses)
    nemesis = Nemesis(cluster, net, random.Random(3))
    try:
        assert nemesis.side_of("n1") is None
        desc = await nemesis.partition("isolate", target="n2")
        assert desc["shape"] == "isolate" and desc["groups"] == [["n1", "n3"], ["n2"]]
        assert desc["sides"]["n2"] == MINORITY
        assert set(net.blocked()) == {("n2", "n1"), ("n2", "n3"), ("n1", "n2"), ("n3", "n2")}
        assert nemesis.side_of("n2") == MINORITY and nemesis.side_of("n1") == MAJORITY
        assert await nemesis.resolve("minority") == ["n2"]
        assert net.link("n1", "n2").policy.mode is LinkMode.DROP
        await nemesis.partition("groups", groups=[["n1"]], mode=LinkMode.REJECT)
        assert net.link("n1", "n2").policy.mode is LinkMode.REJECT
        assert net.link("n2", "n3").policy.mode is LinkMode.PASS
        healed = await nemesis.heal()
        assert healed == {"healed": "groups"}
        assert net.blocked() == [] and nemesis.side_of("n2") is None
    finally:
        await nemesis.close()
        await net.close()
        for s in servers:
            s.close()
