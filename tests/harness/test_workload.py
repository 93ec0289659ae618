"""The register workload's deletes, against one real node of each store.

A single node is a single replica, so even the gossip store's history must be linearizable
here: reads after a delete return absent, deletes and writes interleave as the register
model says. The gossip store's acknowledged writes and deletes carry its HLC timestamp.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness import cluster as cluster_module
from harness.checker.linearizable import check_register
from harness.cluster import LocalCluster
from harness.history import Operation, pair_operations, read_history
from harness.workload import (
    LEVELS,
    ClientSpec,
    Recorder,
    Workload,
    WorkloadConfig,
    _ClientState,
    _layout,
)
from tests.polling import eventually

REGISTER_FS = ("read", "read-local", "write", "delete", "cas")


async def _run(store: str, root: Path, delete_fraction: float, ops: int) -> list[Operation]:
    cluster = LocalCluster(store, 1, root / "cluster")
    try:
        cluster.start()
        await cluster.wait_ready(timeout=30)
        # raft: a leader first (refusals until then are retried: nothing was applied)
        async with KVClient(list(cluster.endpoints.values()), retries=50, retry_budget_s=30) as c:
            await c.put("__ready__", b"1")
        recorder = Recorder(root / "history.jsonl", time.monotonic_ns())
        config = WorkloadConfig(
            kind="register", keys=2, clients_per_node=3, seed=5, delete_fraction=delete_fraction
        )
        workload = Workload(config, cluster.endpoints, recorder)
        stop = asyncio.Event()
        task = asyncio.create_task(workload.run(stop))
        try:
            await eventually(lambda: workload.counts["ok"] >= ops or task.done(), timeout=60)
        finally:
            stop.set()
            await task
            recorder.close()
    finally:
        cluster.close()
    assert not cluster_module._LIVE
    return pair_operations(read_history(root / "history.jsonl"))


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("store", ["raft", "gossip"])
async def test_register_workload_deletes(store: str, tmp_path: Path) -> None:
    ops = await _run(store, tmp_path, 0.15, 300)
    register = [o for o in ops if o.f in REGISTER_FS]
    deletes = [o for o in register if o.f == "delete"]
    assert len(register) >= 300
    assert 0.07 <= len(deletes) / len(register) <= 0.25, (len(deletes), len(register))
    acked = [o for o in deletes if o.type == "ok"]
    assert len(acked) >= 0.9 * len(deletes), "a single healthy node acknowledges its deletes"
    assert all(o.value is None and o.result is None for o in deletes)
    absent_reads = [o for o in register if o.f == "read" and o.type == "ok" and o.result is None]
    assert absent_reads, "no read found a deleted (or never written) key"
    mutations = [o for o in register if o.type == "ok" and o.f in ("write", "delete")]
    if store == "gossip":
        assert all(o.hlc is not None and o.hlc[2] == "n1" for o in mutations)
        stamps = [o.hlc for o in mutations if o.hlc is not None]
        assert len(set(stamps)) == len(stamps), "HLC timestamps are unique per node"
        assert all(o.log_index is None for o in ops)
    else:
        assert all(o.hlc is None for o in mutations)
        # every acknowledged mutation carries its raft log index, each a different one
        acked_mutations = [o for o in ops if o.type == "ok" and o.f in ("write", "delete", "cas")]
        indexes = [o.log_index for o in acked_mutations]
        assert None not in indexes and len(set(indexes)) == len(indexes)
        assert all(o.log_index is None for o in ops if o.f in ("read", "read-local"))
    res = check_register(register, timeout_s=30)
    assert res.valid is True, res.summary()


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_no_deletes_when_the_fraction_is_zero(tmp_path: Path) -> None:
    ops = await _run("gossip", tmp_path, 0.0, 100)
    assert [o for o in ops if o.f == "delete"] == []
    assert sum(1 for o in ops if o.f == "write") >= 20


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_conflict_keys_are_written_only_during_a_partition(tmp_path: Path) -> None:
    cluster = LocalCluster("raft", 1, tmp_path / "cluster")
    partitioned = True
    try:
        cluster.start()
        await cluster.wait_ready(timeout=30)
        async with KVClient(list(cluster.endpoints.values()), retries=50, retry_budget_s=30) as c:
            await c.put("__ready__", b"1")
        recorder = Recorder(tmp_path / "history.jsonl", time.monotonic_ns())
        config = WorkloadConfig(kind="counter", keys=2, clients_per_node=3, seed=2, conflict_keys=2)
        workload = Workload(
            config,
            cluster.endpoints,
            recorder,
            lambda _node: "minority" if partitioned else None,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(workload.run(stop))
        try:
            await eventually(lambda: workload.counts["ok"] >= 300 or task.done(), timeout=60)
            partitioned = False
            healed_ns = recorder.now()
            await eventually(lambda: workload.counts["ok"] >= 500 or task.done(), timeout=60)
        finally:
            stop.set()
            await task
            recorder.close()
    finally:
        cluster.close()
    ops = pair_operations(read_history(tmp_path / "history.jsonl"))
    conflict = [o for o in ops if o.key in ("lww0", "lww1")]
    assert {o.key for o in conflict} == {"lww0", "lww1"}  # ~30 of the first 300 operations
    assert all(o.f == "write" and o.side == "minority" for o in conflict)
    assert all(o.invoke_time < healed_ns for o in conflict), "a conflict write after the heal"
    values = [o.value for o in conflict]
    assert len(set(values)) == len(values), "written values are unique"
    assert all(o.log_index is not None for o in conflict if o.type == "ok")
    assert check_register(conflict, timeout_s=30).valid is True


def test_delete_fraction_is_checked() -> None:
    with pytest.raises(ValueError, match=r"delete_fraction must be between 0 and 0\.5"):
        WorkloadConfig(delete_fraction=0.6)
    assert WorkloadConfig().delete_fraction == 0.15


# -- read levels (the consistency spectrum) ------------------------------------------------


class FakeSessionClient:
    """Answers like a store that hands out a fresh session token with every response (as
    ``KVClient(session=True)`` adopts them), and logs the token each request carried."""

    def __init__(self) -> None:
        self.session_token = b""
        self.n = 0
        self.sent: list[tuple[str, str, bytes]] = []  # (op, key, token carried)

    def _answer(self, op: str, key: str) -> kv_pb2.ResponseHeader:
        self.sent.append((op, key, self.session_token))
        self.n += 1
        self.session_token = f"{op}{self.n}".encode()
        return kv_pb2.ResponseHeader(session_token=self.session_token)

    async def put(self, key: str, value: bytes) -> kv_pb2.PutResponse:
        return kv_pb2.PutResponse(header=self._answer("write", key))

    async def cas(
        self, key: str, expected: bytes | None, new: bytes
    ) -> kv_pb2.CompareAndSwapResponse:
        return kv_pb2.CompareAndSwapResponse(header=self._answer("write", key), swapped=True)

    async def get(self, key: str, level: int, *, max_staleness_ms: int = 0) -> SimpleNamespace:
        self._answer("read", key)
        return SimpleNamespace(value=b"x", level=level, bound=max_staleness_ms)


@pytest.mark.parametrize(
    ("level", "adopts"),
    [("session", {"read", "write"}), ("read_my_writes", {"write"}), ("monotonic_reads", {"read"})],
)
async def test_session_levels_keep_only_the_token_their_guarantee_needs(
    level: str, adopts: set[str], tmp_path: Path
) -> None:
    config = WorkloadConfig(kind="register", levels=(level,), own_keys=True, clients_per_node=2)
    wl = Workload(
        config, {"n1": "127.0.0.1:1"}, Recorder(tmp_path / "h.jsonl", time.monotonic_ns())
    )
    fake = FakeSessionClient()
    state = _ClientState(
        process=0, rng=random.Random(1), spec=wl.pins[0], level=LEVELS[level], index=0
    )
    state.client = fake  # type: ignore[assignment]
    for _ in range(200):
        await wl._register_op(fake, "n1", state)  # type: ignore[arg-type]
    expected = b""
    for i, (op, _key, carried) in enumerate(fake.sent):
        assert carried == expected, (i, op, carried, expected)
        if op in adopts:
            expected = f"{op}{i + 1}".encode()
    assert {op for op, _, _ in fake.sent} == {"read", "write"}


async def test_own_keys_and_levels_in_the_history(tmp_path: Path) -> None:
    config = WorkloadConfig(
        kind="register", levels=("bounded_staleness",), own_keys=True, max_staleness_ms=250
    )
    path = tmp_path / "h.jsonl"
    wl = Workload(config, {"n1": "a", "n2": "b"}, Recorder(path, time.monotonic_ns()))
    assert wl.clients == 4 and wl.register_names() == ["w0", "w1", "w2", "w3"]
    fake = FakeSessionClient()
    state = _ClientState(
        process=1, rng=random.Random(2), spec=wl.pins[1], level=LEVELS["bounded_staleness"], index=1
    )
    for _ in range(300):
        await wl._register_op(fake, "n2", state)  # type: ignore[arg-type]
    wl.recorder.close()
    ops = pair_operations(read_history(path))
    writes = [o for o in ops if o.f in ("write", "cas")]
    reads = [o for o in ops if o.f.startswith("read")]
    assert {o.key for o in writes} == {"w1"}, "a client writes only its own register"
    assert {(o.f, o.type) for o in writes} == {("write", "ok"), ("cas", "ok")}
    own = sum(1 for o in reads if o.key == "w1") / len(reads)
    assert 0.35 < own < 0.65, own
    assert {o.key for o in reads} == {"w0", "w1", "w2", "w3"}
    assert all(o.f == "read-local" and o.consistency == "bounded_staleness" for o in reads)
    assert all(o.consistency == "bounded_staleness" and o.client == 1 for o in ops)
    assert not [o for o in ops if o.f == "delete"]


def test_layout_of_levels_and_roamers() -> None:
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    config = WorkloadConfig(levels=("strong", "session"), roam=0.4, clients_per_node=1)
    specs = _layout(nodes, config)
    assert [s.level for s in specs] == ["strong"] * 5 + ["session"] * 5
    for level in ("strong", "session"):
        mine = [s for s in specs if s.level == level]
        assert [s.node for s in mine] == nodes
        assert sum(s.roaming for s in mine) == 2
    assert _layout(nodes, WorkloadConfig(clients_per_node=2)) == [
        ClientSpec(n) for n in nodes for _ in range(2)
    ]
    with pytest.raises(ValueError, match="unknown read level"):
        WorkloadConfig(levels=("linearizable",))
    with pytest.raises(ValueError, match="roam must be between"):
        WorkloadConfig(roam=1.5)
