"""GossipCore: client ops, membership (SWIM), anti-entropy cost, tombstone GC, accounting."""

from __future__ import annotations

import dataclasses
import random

import pytest

from gossip.core import GossipConfig, GossipCore, ValueOutOfRangeError
from gossip.crdt import Counter, Register, Value, WrongTypeError, applied_key, payload_digest
from gossip.hlc import Timestamp
from gossip.messages import (
    ALIVE,
    DEAD,
    SUSPECT,
    Ack,
    AeItems,
    AeRequest,
    AeResponse,
    Deltas,
    Member,
    Message,
    Ping,
    PingReq,
    wire_size,
)
from gossip.sim import Sim

QUIET = GossipConfig(  # no timers fire during the direct tests below
    gossip_interval_ms=10**9,
    anti_entropy_interval_ms=10**9,
    ping_interval_ms=10**9,
    ping_timeout_ms=10**9 - 1,
)


def core(node: str = "a", members: tuple[str, ...] = ("a", "b"), **kw: object) -> GossipCore:
    state = kw.pop("state", None)
    cfg = kw.pop("config", QUIET)
    component = kw.pop("component", None)
    assert isinstance(cfg, GossipConfig)
    assert component is None or isinstance(component, str)
    return GossipCore(
        node,
        members,
        cfg,
        random.Random(1),
        state=state,  # type: ignore[arg-type]
        now_ms=0,
        component=component,
    )


# ---------------------------------------------------------------------------- client ops


def test_writes_return_delta_and_typed_errors() -> None:
    c = core()
    w = c.put("k", b"v", 100)
    assert w.delta == {"k": Register(w.ts, b"v")} and w.ts.node == "a"
    assert c.get("k") == Register(w.ts, b"v")
    w2 = c.delete("k", 100)
    assert w2.ts > w.ts and c.get("k") == Register(w2.ts, None)
    with pytest.raises(WrongTypeError) as e:
        c.increment("k", 1, 100)  # a tombstoned register key stays a register
    assert e.value.actual == "register" and e.value.key == "k"
    w3 = c.increment("n", 5, 100)
    assert w3.delta == {"n": Counter({"a": 5}, {})}
    c.increment("n", -7, 100)
    got = c.get("n")
    assert isinstance(got, Counter) and got.value == -2
    with pytest.raises(WrongTypeError) as e:
        c.put("n", b"x", 100)
    assert e.value.actual == "counter"
    with pytest.raises(WrongTypeError):
        c.delete("n", 100)
    with pytest.raises(ValueOutOfRangeError):
        c.increment("n", 2**63 + 5, 100)
    got = c.get("n")
    assert isinstance(got, Counter) and got.value == -2  # unchanged


def test_restart_never_reissues_older_timestamps() -> None:
    old = Timestamp(50_000, 3, "a")
    c = core(state={"k": Register(old, b"x")})
    assert c.put("k2", b"y", 10).ts > old  # physical clock far behind the persisted write


# ---------------------------------------------------------------------------- anti-entropy

AE = (AeRequest, AeResponse, AeItems)


def _exchange(a: GossipCore, b: GossipCore) -> tuple[int, int]:
    """One anti-entropy round a -> b, delivered reliably. Returns (bytes, messages)."""
    a.start_anti_entropy(0, b.node_id)
    queue: list[Message] = list(a.take_outputs().messages)
    total = count = 0
    while queue:
        m = queue.pop(0)
        assert isinstance(m, AE)
        total += wire_size(m)
        count += 1
        dst = a if m.to == a.node_id else b
        dst.step(m, 0)
        queue += dst.take_outputs().messages
    return total, count


N_KEYS = 100_000


@pytest.fixture(scope="module")
def big_state() -> dict[str, Value]:
    return {
        f"key-{i:06d}": Register(Timestamp(1000 + i, 0, "a"), b"value-%d" % i)
        for i in range(N_KEYS)
    }


def _ae_cost(base: dict[str, Value], d: int) -> int:
    other = dict(base)
    for i in random.Random(d).sample(range(N_KEYS), d):
        other[f"key-{i:06d}"] = Register(Timestamp(10**7, i, "b"), b"new")
    a = core("a", state=base)
    b = core("b", state=other)
    total = 0
    for _ in range(20):
        if a.digest() == b.digest():
            break
        total += _exchange(a, b)[0]
    assert a.digest() == b.digest()
    assert dict(a.state()) == dict(b.state()) == {**base, **other}
    return total


def test_anti_entropy_cost(big_state: dict[str, Value]) -> None:
    a = core("a", state=big_state)
    b = core("b", state=dict(big_state))
    nbytes, nmsgs = _exchange(a, b)
    assert nmsgs == 2 and nbytes <= 1024  # root hash + "in sync"
    depth = a.config.merkle_depth
    per_key = depth * 16 * 26 + 400  # 16 child (index, hash) pairs per level + leaf items
    cost10 = _ae_cost(big_state, 10)
    cost1000 = _ae_cost(big_state, 1000)
    assert cost10 <= 10 * per_key + 1024
    assert cost1000 <= 1000 * per_key + 1024
    full = sum(wire_size(AeItems("a", "b", 0, (), ((k, v),), False)) for k, v in big_state.items())
    print(f"anti-entropy bytes: identical={nbytes} d=10: {cost10} d=1000: {cost1000} full={full}")
    assert cost1000 * 8 < full  # 1% of the keys differ: far less than shipping the state
    assert cost10 * 30 < cost1000 < cost10 * 120  # ~linear in d (times log n), not in n


# ---------------------------------------------------------------------------- membership


class CountingSim(Sim):
    """Sim that counts sent message types."""

    def __init__(self, *a: object, **kw: object) -> None:
        self.sent: dict[str, int] = {}
        super().__init__(*a, **kw)  # type: ignore[arg-type]

    def _send(self, msg: Message) -> None:
        name = type(msg).__name__
        self.sent[name] = self.sent.get(name, 0) + 1
        super()._send(msg)


def _view(sim: Sim, observer: str, node: str) -> tuple[str, int]:
    c = sim.cores[observer]
    assert c is not None
    m = c.member_states()[node]
    return m.state, m.incarnation


def test_crash_suspect_dead_then_rejoin() -> None:
    sim = Sim(7, 3, max_skew_ms=0)
    sim.advance(1000)
    assert all(_view(sim, o, n) == (ALIVE, 0) for o in sim.nodes for n in sim.nodes if o != n)
    sim.crash("n2")
    seen: list[str] = []
    for _ in range(200):
        sim.advance(25)
        st = _view(sim, "n0", "n2")[0]
        if not seen or seen[-1] != st:
            seen.append(st)
        if st == DEAD and _view(sim, "n1", "n2")[0] == DEAD:
            break
    assert seen == [ALIVE, SUSPECT, DEAD]
    sim.advance(3000)
    assert _view(sim, "n0", "n2")[0] == DEAD  # no false revival while it is down
    sim.restart("n2")
    sim.advance(5000)  # dead members are still probed (at a low rate)
    for o in ("n0", "n1"):
        state, inc = _view(sim, o, "n2")
        assert state == ALIVE and inc >= 1  # n2 refuted its death by bumping its incarnation
    restarted = sim.cores["n2"]
    assert restarted is not None and restarted.incarnation >= 1
    assert all(_view(sim, "n2", n)[0] == ALIVE for n in ("n0", "n1"))


def test_indirect_ping_keeps_member_alive() -> None:
    sim = CountingSim(3, 3, max_skew_ms=0)
    sim.advance(500)
    sim.blocked = {frozenset(("n0", "n1"))}  # n0 and n1 only reach each other through n2
    for _ in range(200):
        sim.advance(25)
        assert _view(sim, "n0", "n1")[0] == ALIVE
        assert _view(sim, "n1", "n0")[0] == ALIVE
    assert sim.sent.get("PingReq", 0) > 0
    # without a relay the member is suspected and then declared dead
    sim.blocked = {frozenset(("n0", "n1")), frozenset(("n2", "n1"))}
    sim.advance(3000)
    assert _view(sim, "n0", "n1")[0] == DEAD and _view(sim, "n2", "n1")[0] == DEAD


def test_refute_suspicion_with_higher_incarnation() -> None:
    c = core("a", ("a", "b", "c"))
    c.step(Ping("b", "a", 9, 0, (Member("a", SUSPECT, 0),)), 0)
    assert c.incarnation == 1
    (ack,) = c.take_outputs().messages
    assert isinstance(ack, Ack) and ack.seq == 9 and ack.node == "a" and ack.incarnation == 1
    assert Member("a", ALIVE, 1) in ack.gossip_updates
    # stale suspicion (older incarnation) is ignored
    c.step(Ping("b", "a", 10, 0, (Member("a", DEAD, 0),)), 0)
    assert c.incarnation == 1
    # a suspicion of another member is overridden only by a higher incarnation
    c.step(Ping("b", "a", 11, 0, (Member("c", SUSPECT, 0),)), 0)
    assert c.member_states()["c"].state == SUSPECT
    c.step(Ping("b", "a", 12, 0, (Member("c", ALIVE, 0),)), 0)
    assert c.member_states()["c"].state == SUSPECT
    c.step(Ping("b", "a", 13, 0, (Member("c", ALIVE, 1),)), 0)
    assert c.member_states()["c"].state == ALIVE


def test_ping_req_relays_ack() -> None:
    c = core("b", ("a", "b", "c"))
    c.step(PingReq("a", "b", 42, "c", ()), 0)
    (ping,) = c.take_outputs().messages
    assert isinstance(ping, Ping) and ping.to == "c"
    c.step(Ack("c", "b", ping.seq, "c", 0, ()), 0)
    (fwd,) = c.take_outputs().messages
    assert isinstance(fwd, Ack) and fwd.to == "a" and fwd.seq == 42 and fwd.node == "c"


# ---------------------------------------------------------------------------- tombstones


def test_tombstone_gc_only_after_all_members_have_it() -> None:
    cfg = GossipConfig(tombstone_min_age_ms=500, merkle_depth=2)
    sim = Sim(11, 3, cfg, max_skew_ms=0)
    sim.client_op("n0", "put", "k", value=b"v")
    assert sim.wait_converged(5000) is not None
    sim.crash("n2")
    sim.client_op("n0", "delete", "k")
    sim.advance(5000)
    for n in ("n0", "n1"):
        c = sim.cores[n]
        assert c is not None and c.tombstone_count() == 1 and c.stats.tombstones_collected == 0
        assert "k" in sim.durable(n)
    sim.restart("n2")
    assert sim.wait_converged(10_000) is not None
    sim.advance(3000)
    assert sim.wait_converged(10_000) is not None
    for n in sim.nodes:
        c = sim.cores[n]
        assert c is not None and c.get("k") is None and c.tombstone_count() == 0
        assert c.stats.tombstones_collected == 1 and c.stats.tombstones_force_collected == 0
        assert "k" not in sim.durable(n)
    assert not sim.check()


def test_tombstone_grace_period_forces_gc() -> None:
    cfg = GossipConfig(tombstone_min_age_ms=500, tombstone_grace_ms=2000, merkle_depth=2)
    sim = Sim(12, 3, cfg, max_skew_ms=0)
    sim.client_op("n0", "put", "k", value=b"v")
    assert sim.wait_converged(5000) is not None
    sim.crash("n2")
    sim.client_op("n0", "delete", "k")
    sim.advance(4000)
    c = sim.cores["n0"]
    assert c is not None and c.get("k") is None and c.stats.tombstones_force_collected == 1


# ---------------------------------------------------------------------------- accounting


def test_lww_overwrite_and_type_conflict_accounting() -> None:
    sim = Sim(5, 2, max_skew_ms=0)
    sim.blocked = {frozenset(("n0", "n1"))}
    sim.client_op("n0", "put", "k", value=b"first")
    sim.advance(50)
    sim.client_op("n1", "put", "k", value=b"second")  # concurrent, larger HLC timestamp
    sim.client_op("n0", "put", "t", value=b"reg")
    sim.client_op("n1", "increment", "t", delta=3)
    sim.advance(2000)
    sim.heal()
    assert sim.wait_converged(10_000) is not None
    a, b = sim.cores["n0"], sim.cores["n1"]
    assert a is not None and b is not None
    got = a.get("k")
    assert isinstance(got, Register) and got.value == b"second"
    assert a.stats.lww_overwrites == 1 and b.stats.lww_overwrites == 0
    t = a.get("t")
    assert isinstance(t, Counter) and t.value == 3  # type conflict: the counter wins
    assert a.stats.type_conflict_overwrites == 1 and b.stats.type_conflict_overwrites == 0
    assert a.digest() == b.digest()


def _leave_n2_behind(cfg: GossipConfig) -> Sim:
    """30 writes on n0 while n2 is cut off: more than the delta log keeps (4 keys)."""
    sim = Sim(6, 3, cfg, max_skew_ms=0)
    sim.advance(500)
    sim.blocked = {frozenset(("n0", "n2")), frozenset(("n1", "n2"))}
    for i in range(30):
        sim.client_op("n0", "put", f"k{i}", value=b"%d" % i)
        sim.advance(25)
    sim.heal()
    return sim


def test_peer_too_far_behind_falls_back_to_anti_entropy() -> None:
    sim = _leave_n2_behind(GossipConfig(delta_log_max=4, merkle_depth=2))
    assert sim.wait_converged(10_000) is not None
    c = sim.cores["n0"]
    assert c is not None and c.stats.peers_fell_behind >= 1
    assert not sim.check()
    n2 = sim.cores["n2"]
    assert n2 is not None and len(n2.state()) == 30


# ---------------------------------------------------------------------------- bulk repair


def test_cover_codes_name_leaves_and_subtrees() -> None:
    from gossip.merkle import MerkleTree

    t = MerkleTree(3)
    assert t.cover_code(3, 77) == 77 and t.cover_leaves([77]) == [77]
    assert t.cover_leaves([t.cover_code(0, 0)]) == list(range(4096))
    assert t.cover_leaves([t.cover_code(1, 5)]) == list(range(5 * 256, 6 * 256))
    assert t.cover_leaves([t.cover_code(2, 17)]) == list(range(17 * 16, 18 * 16))
    assert t.cover_leaves([-1, 4096 + 273, 10**9]) == []  # invalid codes are ignored


def test_bulk_anti_entropy_repairs_many_keys_in_one_round() -> None:
    ts = Timestamp(1000, 0, "a")
    left = {f"k{i:05d}": Register(ts, b"L") for i in range(3000)}
    right = {f"k{i:05d}": Register(Timestamp(2000, 0, "b"), b"R") for i in range(1500, 4500)}
    a, b = core("a", state=left), core("b", state=right)
    _, nmsgs = _exchange(a, b)
    assert a.digest() == b.digest() and len(a.state()) == 4500
    assert dict(a.state()) == {**left, **right}
    # root + 3 levels of hashes, then the items in chunks and one reply per chunk
    chunks = -(-3000 // a.config.ae_chunk_items)
    assert nmsgs <= 4 + 2 * (chunks + 1)
    assert a.stats.ae_items_sent + b.stats.ae_items_sent <= 3000 + 3000


def test_peer_back_from_dead_is_repaired_by_anti_entropy_not_deltas() -> None:
    sim = Sim(21, 3, max_skew_ms=0)
    sim.advance(500)
    sim.blocked = {frozenset(("n0", "n2")), frozenset(("n1", "n2"))}
    for i in range(500):
        sim.client_op("n0", "put", f"k{i}", value=b"v")
    sim.advance(4000)  # n2 is declared dead; n1 got the keys by deltas
    assert all(c is not None and c.member_states()["n2"].state == DEAD for c in sim.live()[:2])
    before = {n: c.stats.delta_entries_sent for n, c in sim.cores.items() if c is not None}
    items = sum(c.stats.ae_items_sent for c in sim.live())
    sim.heal()
    assert sim.wait_converged(5000) is not None
    n2 = sim.cores["n2"]
    assert n2 is not None and len(n2.state()) == 500
    after = {n: c.stats.delta_entries_sent for n, c in sim.cores.items() if c is not None}
    # without repair mode n0 and n1 would each stream the 500-key backlog to n2
    assert sum(after[n] - before[n] for n in after) < 250
    assert sum(c.stats.ae_items_sent for c in sim.live()) - items >= 500
    assert not sim.check()


# ------------------------------------------------------- anti-entropy timing, periodic off


NO_PERIODIC_AE = GossipConfig(anti_entropy_interval_ms=10**9)


def test_peer_fallen_behind_is_repaired_without_waiting_for_the_timer() -> None:
    sim = _leave_n2_behind(dataclasses.replace(NO_PERIODIC_AE, delta_log_max=4, merkle_depth=2))
    assert sim.wait_converged(3000) is not None
    c = sim.cores["n0"]
    assert c is not None and c.stats.peers_fell_behind >= 1
    assert not sim.check()


def _isolate_and_return(sim: Sim, node: str, keys: range) -> int | None:
    others = [n for n in sim.cores if n != node]
    sim.blocked = {frozenset((node, o)) for o in others}
    for i in keys:
        sim.client_op(others[0], "put", f"k{i}", value=b"v")
    sim.advance(4000)  # declared dead by the others
    sim.heal()
    return sim.wait_converged(3000)


def test_repair_windows_count_in_round_timeouts_not_in_the_interval() -> None:
    # Two peers come back one after the other, 4 s apart. Each gets its bulk repair at
    # once: the "one repair at a time" window is two round timeouts (2 s), not two
    # anti-entropy intervals (here: never again).
    sim = Sim(3, 3, NO_PERIODIC_AE, max_skew_ms=0)
    sim.advance(500)
    assert _isolate_and_return(sim, "n2", range(300)) is not None
    assert _isolate_and_return(sim, "n1", range(300, 600)) is not None
    assert not sim.check()


# ---------------------------------------------------------------------------- edges (issue 13)


def _pump(cores: dict[str, GossipCore], first: list[Message], now: int = 0) -> list[Message]:
    """Deliver messages (and everything they cause) reliably; returns all delivered."""
    queue, seen = list(first), []
    while queue:
        m = queue.pop(0)
        seen.append(m)
        dst = cores[m.to]
        dst.step(m, now)
        queue += dst.take_outputs().messages
    return seen


def test_the_clock_follows_a_far_future_value_so_later_local_writes_win() -> None:
    """A value more than max_drift_ms ahead was merged while the HLC stayed behind it:
    the next local write got a lower timestamp and lost on the node that took it."""
    a = core("a")
    future = Timestamp(10_000_000, 0, "b")  # 10,000 s ahead of a's clock (0)
    deltas = [m for m in _deltas_from("b", "a", [("k", Register(future, b"old"))])]
    for m in deltas:
        a.step(m, 0)
    w = a.put("k", b"new", 0)
    assert w.ts > future
    assert a.get("k") == Register(w.ts, b"new")
    assert a.stats.clock_jumps == 1 and a.stats.max_clock_jump_ms == 10_000_000


def _deltas_from(frm: str, to: str, entries: list[tuple[str, Value]]) -> list[Message]:
    from gossip.messages import Deltas

    return [Deltas(frm, to, tuple(entries), 1)]


@pytest.mark.parametrize("sizes", [[700_000] * 5, [1 << 20] * 3, [10] * 50 + [1 << 20]])
def test_deltas_and_anti_entropy_stay_within_the_message_budget(sizes: list[int]) -> None:
    """Deltas were sized by entry count only: a few 1 MiB values made one message (and
    one peer Batch) bigger than any receiver accepts, and replication stopped."""
    cfg = dataclasses.replace(QUIET, gossip_interval_ms=100, max_message_bytes=1 << 20)
    a, b = core("a", config=cfg), core("b", config=cfg)
    for i, n in enumerate(sizes):
        a.put(f"k{i}", bytes([i % 256]) * n, 0)
    limit = (1 << 20) + 2048 + 200  # one entry may be a whole 1 MiB value (+ key, header)

    def bounded(m: Message) -> bool:
        n = len(getattr(m, "entries", getattr(m, "items", ())))
        return wire_size(m) <= limit or n == 1

    cores = {"a": a, "b": b}
    for now in range(0, 3000, 100):  # gossip timer turns; acks release the next batch
        a.tick(now)
        seen = _pump(cores, list(a.take_outputs().messages), now)
        assert all(bounded(m) for m in seen), [wire_size(m) for m in seen]
    assert b.digest() == a.digest()
    # and anti-entropy ships the same state in bounded messages too
    c = core("b", config=cfg)
    a.start_anti_entropy(3000, "b")
    seen = _pump({"a": a, "b": c}, list(a.take_outputs().messages), 3000)
    assert all(bounded(m) for m in seen), [wire_size(m) for m in seen]
    assert c.digest() == a.digest()
    # the empty side starting the round: the full side's items travel as replies
    a2 = core("a", config=cfg)
    a2.start_anti_entropy(3000, "b")
    seen = _pump({"a": a2, "b": c}, list(a2.take_outputs().messages), 3000)
    assert all(bounded(m) for m in seen), [wire_size(m) for m in seen]
    assert a2.digest() == c.digest()
    assert sum(isinstance(m, AeItems) and len(m.items) > 0 for m in seen) >= 2


def test_equal_timestamps_with_different_values_join_deterministically() -> None:
    """A corrupt copy (same timestamp, one flipped byte) won whenever its bytes compared
    larger; now the tie is broken by a hash, the same on every replica, and counted."""
    from gossip.crdt import merge_register

    ts = Timestamp(5, 0, "a")
    good, bad = Register(ts, b"value"), Register(ts, b"valuf")
    assert merge_register(good, bad) == merge_register(bad, good)
    flipped = [(Register(ts, bytes([i])), Register(ts, bytes([i + 1]))) for i in range(50)]
    winners = [merge_register(x, y) is y for x, y in flipped]
    assert any(winners) and not all(winners)  # not "the larger value wins"
    a = core("a", state={"k": good})
    for m in _deltas_from("b", "a", [("k", bad)]):
        a.step(m, 0)
    assert a.stats.register_conflicts == 1


def test_counter_components_pass_int64_and_the_value_saturates_only_on_read() -> None:
    from gossip.crdt import INT64_MAX, saturate

    a = core("a")
    for d in (INT64_MAX, -INT64_MAX, INT64_MAX, -INT64_MAX, INT64_MAX):
        a.increment("c", d, 0)
    v = a.get("c")
    assert isinstance(v, Counter) and v.value == INT64_MAX
    assert v.p["a"] == 3 * INT64_MAX and v.n["a"] == 2 * INT64_MAX
    b = core("b", state={"c": Counter({"b": INT64_MAX}, {})})
    for m in _deltas_from("a", "b", [("c", v)]):
        b.step(m, 0)
    got = b.get("c")
    assert isinstance(got, Counter) and got.value == 2 * INT64_MAX
    assert saturate(got.value) == INT64_MAX
    with pytest.raises(ValueOutOfRangeError):
        b.increment("c", 1, 0)
    b.increment("c", -INT64_MAX, 0)


def test_a_node_that_lost_its_data_counts_in_a_new_component() -> None:
    a = core("a", component="a/1f2e3d4c")
    w = a.increment("c", 5, 0)
    assert w.delta == {"c": Counter({"a/1f2e3d4c": 5}, {})}


def test_records_out_of_their_window_stay_until_the_writers_mark_covers_them() -> None:
    """A replica dropped a record out of its client's window on arrival while the other
    replicas (its writer included) kept it until the writer's stable mark covered it: the
    states differed, no anti-entropy round found equal roots, and after a partition the
    repair streamed the whole backlog again (~9 s instead of ~3 s to one state,
    ``harness.bench_convergence``). Now it is dropped on arrival only once the mark
    covers it, as every replica drops it."""
    cfg = dataclasses.replace(QUIET, dedup_window=4)
    members = ("a", "b", "c")  # c hears nothing: a's stable mark cannot move
    a, b = core("a", members, config=cfg), core("b", members, config=cfg)
    for seq in range(1, 11):
        a.put(f"k{seq}", b"v", seq, rid=("client", seq))
    a.take_outputs()
    # the latest request first (anti-entropy ships in leaf order: any order)
    latest = applied_key("client", 10)
    rest = [(k, v) for k, v in a.state().items() if k != latest]
    for m in _deltas_from("a", "b", [(latest, a.state()[latest])]) + _deltas_from("a", "b", rest):
        b.step(m, 20)
    assert b.digest() == a.digest()
    assert b.record_count() == a.record_count() == 10


def test_records_keep_a_digest_of_the_payload_and_copies_without_it_are_no_duplicates() -> None:
    """Each record keeps the digest of its request's payload (put: the value, increment:
    the delta; a delete has none). A copy that lost it (relayed by an older version, which
    does not know the field) is the same application: the join keeps the digest, and it
    is not settled as a second application (that would undo the increment)."""
    a = core("a")
    a.put("k", b"first", 1, rid=("cl", 1))
    a.increment("n", 5, 2, rid=("cl", 2))
    a.delete("k", 3, rid=("cl", 3))
    put, inc, dele = (a.lookup("cl", i) for i in (1, 2, 3))
    assert put is not None and put.digest == payload_digest("put", b"first")
    assert inc is not None and inc.digest == payload_digest("increment", delta=5)
    assert dele is not None and dele.digest == b""
    stripped: list[tuple[str, Value]] = [
        (applied_key("cl", i), dataclasses.replace(r, digest=b"")) for i, r in ((1, put), (2, inc))
    ]
    for m in _deltas_from("b", "a", stripped):
        a.step(m, 10)
    assert (a.lookup("cl", 1), a.lookup("cl", 2)) == (put, inc)
    assert a.stats.duplicates_merged == 0 and a.get("n") == Counter({"a": 5}, {})
    # a replica that heard the stripped copy first takes the digest when it arrives
    b = core("b")
    for m in _deltas_from("a", "b", stripped):
        b.step(m, 10)
    assert b.lookup("cl", 1) == stripped[0][1]
    for m in _deltas_from("a", "b", [(applied_key("cl", 1), put)]):
        b.step(m, 11)
    assert b.lookup("cl", 1) == put and b.stats.duplicates_merged == 0


def test_an_ack_of_our_deltas_is_no_sync_from_the_peer() -> None:
    """Bounded-staleness reads trust ``last_sync_ms[p]`` to mean this node received p's
    writes; an ack of our own Deltas proves only that p received ours (issue 16)."""
    from gossip.messages import Deltas, DeltasAck

    a = core()
    a.step(DeltasAck("b", "a", 1), 50)
    assert "b" not in a.last_sync_ms
    a.step(Deltas("b", "a", (), 1, complete=True), 60)
    assert a.last_sync_ms["b"] == 60


def test_only_a_batch_that_brings_the_peer_to_the_head_of_the_log_is_a_sync() -> None:
    """A backlog travels in several batches (``delta_batch_max`` keys each, pipelined). The
    first batch after a heal used to count as a sync: a node that held a fraction of a
    14 s backlog served BOUNDED_STALENESS reads 14 s stale (review of issue 16). Only a
    batch that starts where the receiver's acknowledgements end and reaches the sender's
    log head says so now."""
    cfg = dataclasses.replace(QUIET, gossip_interval_ms=100, delta_batch_max=10, deltas_window=4)
    a, b = core("a", config=cfg), core("b", config=cfg)
    for i in range(35):
        a.put(f"k{i}", b"v", 0)
    a.tick(100)
    first = [m for m in a.take_outputs().messages if isinstance(m, Deltas)]
    assert len(first) == 1 and len(first[0].entries) == 10 and not first[0].complete
    syncs: list[tuple[int, bool]] = []
    queue: list[Message] = list(first)
    while queue:  # deliver everything (acks stream the rest of the backlog)
        m = queue.pop(0)
        if isinstance(m, Deltas):
            syncs.append((len(m.entries), m.complete))
            b.step(m, 200)
            held = sum(1 for i in range(35) if b.get(f"k{i}") is not None)
            assert "a" not in b.last_sync_ms or held == 35, (held, syncs)
            queue += b.take_outputs().messages
        else:
            a.step(m, 200)
            queue += a.take_outputs().messages
    assert sorted(n for n, _ in syncs) == [5, 10, 10, 10], syncs
    assert not any(c for n, c in syncs if n == 10)
    # (the last batch was pipelined behind another: no sync yet; bounded-staleness reads
    # meanwhile start anti-entropy rounds, which do count.) The next batch is contiguous:
    a.put("k35", b"v", 250)
    a.tick(250)
    (nxt,) = [m for m in a.take_outputs().messages if isinstance(m, Deltas)]
    assert nxt.complete and len(nxt.entries) == 1
    b.step(nxt, 260)
    assert b.last_sync_ms["a"] == 260
    for m in b.take_outputs().messages:
        a.step(m, 260)
    # a batch sent while an earlier one is unacknowledged is no sync either, though it
    # reaches the head: the earlier one may be lost
    for i in range(36, 50):
        a.put(f"k{i}", b"v", 300)
    a.tick(350)
    out = [m for m in a.take_outputs().messages if isinstance(m, Deltas)]
    assert [(len(m.entries), m.complete) for m in out] == [(10, False), (4, False)]
