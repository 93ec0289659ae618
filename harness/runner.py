"""Run a scenario against one or both stores and check what happened.

Theory of operation
-------------------
For each store, :class:`StoreRun` starts a :class:`~harness.proxy.ProxyNet` (one proxy per
directed node-to-node link) and a :class:`~harness.cluster.LocalCluster` whose peer
addresses point at those proxies (nodes run with ``--enable-admin``), and waits until the
cluster is ready (every node healthy and a write succeeds: for raft, a leader exists).
With ``store: both`` both clusters are set up first and then started *together*: one common
``t0`` (monotonic ns, also recorded as Unix time) is the zero of both histories, both digest
files and both fault timelines, so the two stores live on one time axis.

During the run, per store:

* the workload's clients (closed loops pinned to nodes, talking to them directly) record
  every operation in ``history.jsonl``;
* the fault timeline is executed by a :class:`~harness.nemesis.Nemesis`; each action is an
  ``invoke``/``ok`` pair of process ``"nemesis"`` in the same history, its value the
  description (groups, sides, nodes);
* every ~100 ms each node's ``Cluster.Status`` is sampled into ``digests.jsonl``:
  ``{"time_ns", "digests": {node: hex | null}, "leaders": {node: id}, "terms": {node: n}}``
  (leaders/terms on raft only; null when the node did not answer); on gossip also
  ``"tombstones"`` and ``"tombstones_collected"`` ({node: n}, its Status counters); on
  raft also ``"applied"`` ({node: applied_index}). Every ~250 ms, while no node holds more
  than :data:`DUMP_MAX_KEYS` keys, the sample also carries each node's ``Cluster.Dump``
  digested: ``"differing_keys"`` (keys the replicas disagree on; null unless every node
  answered), ``"dump_ms"``
  and, on gossip, ``"seen"`` ({node: {key: HLC or counter components}}); see
  :mod:`harness.divergence`, which turns them into each node's lag.

When ``duration`` has passed the clients stop; whatever fault is still in force is undone
(heal, resume, restart, skew 0; recorded), the runner waits up to ``converge_timeout`` for
all replicas to report the same digest, reads every counter on every node and, on gossip,
every register (LOCAL reads, recorded); on gossip it then waits up to the scenario's
``tombstone_timeout`` for every node to have collected its tombstones. If the replicas
still disagree, every node's Status and whole state (``Cluster.Dump``) are saved in
``<out>/<store>/dumps/<node>.json`` for a post-mortem. It stops every
process (also on error, Ctrl-C or SIGTERM: try/finally) and runs the checkers. Results go
to ``<out>/<store>/results.json`` and, combined, ``<out>/results.json``.

Checkers: raft, linearizability of the registers (reads, writes, deletes, cas) and stale
LOCAL reads; gossip, the final state of the registers (no acknowledged delete undone, the
last acknowledged write everywhere: :mod:`harness.checker.final_state`), tombstone
collection (:mod:`harness.checker.tombstones`), stale reads and LWW losers; both, counter
bounds and convergence.

Script API
----------
The same steps are available to scenario scripts::

    import asyncio
    from pathlib import Path
    from harness.runner import StoreRun, check_store
    from harness.scenario import Fault, Scenario

    async def main() -> None:
        sc = Scenario(name="by-hand", duration=20, nodes=5, workload="register")
        run = StoreRun(sc, "raft", Path("runs/by-hand"))
        try:
            await run.setup()                        # cluster + proxies, ready
            run.begin()                              # history, digests, workload
            await run.sleep_until(5)                 # seconds since t0
            await run.act(Fault(5, "partition", shape="isolate-leader"))
            await run.sleep_until(12)
            await run.act(Fault(12, "heal"))
            await run.sleep_until(sc.duration)
            await run.end()                          # stop, recover, converge, final reads
        finally:
            await run.close()                        # no process survives
        print(check_store(run)["valid"])

    asyncio.run(main())

:func:`run_scenario` does all of it from a :class:`~harness.scenario.Scenario`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hdrh.histogram import HdrHistogram

from caplab import errors
from caplab.client import KVClient
from harness.checks import (  # the checker dispatch (shared with the report)
    FAULT_ACTIONS,
    FINAL_READ_PROCESS,
    FINAL_REGISTER_READ_PROCESS,
    RECOVERY_ACTIONS,
    counter_verdict,
    fault_window,
    final_reads_from_history,
    run_checkers,
)
from harness.cluster import LocalCluster, free_ports
from harness.history import NEMESIS, Json, Operation, pair_operations, read_history
from harness.nemesis import Nemesis
from harness.proxy import LinkMode, ProxyNet
from harness.scenario import Fault, Scenario
from harness.workload import (
    Recorder,
    Workload,
    WorkloadConfig,
    counter_keys,
    final_counter_reads,
    final_register_reads,
)

SCHEMA_VERSION = 1
SAMPLE_INTERVAL_S = 0.1
DUMP_INTERVAL_S = 0.25  # Cluster.Dump of every node at most this often ...
DUMP_MAX_KEYS = 2000  # ... and only while no node holds more keys than this


def _now_s(t0_ns: int) -> float:
    return (time.monotonic_ns() - t0_ns) / 1e9


class StoreRun:
    """One store's part of a run (see the module docstring)."""

    def __init__(
        self,
        scenario: Scenario,
        store: str,
        out_root: Path,
        *,
        ready_timeout: float = 60.0,
        secure: bool = True,
    ) -> None:
        self.scenario = scenario
        self.secure = secure  # mutual TLS between the nodes (False: --insecure)
        self.store = store
        self.dir = Path(out_root) / store
        self.ready_timeout = ready_timeout
        self.t0_ns = 0
        self.t0_unix_ns = 0
        self.net: ProxyNet | None = None
        self.cluster: LocalCluster | None = None
        self.nemesis: Nemesis | None = None
        self.recorder: Recorder | None = None
        self.workload: Workload | None = None
        self.faults: list[dict[str, Any]] = []
        self.converged_s: float | None = None
        self.final_reads: dict[str, dict[str, int | None]] = {}
        self.final_registers: dict[str, dict[str, str | None]] = {}
        self.end_s: float | None = None
        self.tombstones_collected_s: float | None = None  # gossip: every node holds none
        self._stop = asyncio.Event()
        self._sampling = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._digest_file: IO[str] | None = None
        self._latest_digests: dict[str, str | None] = {}
        self._latest_tombstones: dict[str, int | None] = {}
        self._latest_time_ns = 0
        self._samples_taken = 0
        self._agreeing_run = 0  # consecutive samples, up to the latest, that agree
        # set by _stop_sampler: the sampler stops after an agreeing pair or at this time
        self._stop_agreeing_by: float | None = None
        self._status_client: KVClient | None = None

    @property
    def history_path(self) -> Path:
        return self.dir / "history.jsonl"

    @property
    def digests_path(self) -> Path:
        return self.dir / "digests.jsonl"

    # -- setup ------------------------------------------------------------------
    async def setup(self) -> None:
        """Fresh out dir, proxies, nodes; returns once a write succeeds."""
        sc = self.scenario
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        ids = sc.node_ids
        both = free_ports(2 * len(ids))
        ports, peer_ports = both[: len(ids)], both[len(ids) :]
        # the proxies cut the links between nodes: they stand before the peer listeners
        self.net = ProxyNet(dict(zip(ids, peer_ports, strict=True)), seed=sc.seed)
        await self.net.start()
        self.cluster = LocalCluster(
            self.store,
            sc.nodes,
            self.dir,
            enable_admin=True,
            extra_args=[f"--set={k}={v}" for k, v in sc.options_for(self.store).items()],
            peer_addresses=self.net.peer_addresses,
            ports=ports,
            peer_ports=peer_ports,
            secure=self.secure,
        )
        self.cluster.start()
        await self.cluster.wait_ready(timeout=self.ready_timeout)
        deadline = time.monotonic() + self.ready_timeout
        async with KVClient(list(self.cluster.endpoints.values()), timeout=2.0) as client:
            while True:
                try:
                    await client.put("__caplab_ready__", b"1")
                    break
                except errors.StoreError as e:
                    for node in self.cluster.nodes.values():
                        if not node.running:
                            raise RuntimeError(
                                f"{self.store} node {node.node_id} exited; see {node.log_path}"
                            ) from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{self.store} cluster accepted no write within "
                            f"{self.ready_timeout:g}s: {e.message}"
                        ) from None
                    await asyncio.sleep(0.2)
        self.nemesis = Nemesis(
            self.cluster,
            self.net,
            random.Random(sc.seed),
            mode=LinkMode(sc.partition_mode),
        )
        self._status_client = KVClient(list(self.cluster.endpoints.values()), timeout=0.5)

    # -- run ----------------------------------------------------------------------
    def begin(self, t0_ns: int | None = None, t0_unix_ns: int | None = None) -> None:
        """Open the history and start the digest sampler and the workload at ``t0_ns``
        (monotonic; ``t0_unix_ns`` the same instant in Unix time)."""
        assert self.cluster is not None and self.nemesis is not None
        self.t0_ns = t0_ns if t0_ns is not None else time.monotonic_ns()
        self.t0_unix_ns = t0_unix_ns if t0_unix_ns is not None else time.time_ns()
        self.recorder = Recorder(self.history_path, self.t0_ns)
        sc = self.scenario
        self.workload = Workload(
            WorkloadConfig(
                kind=sc.workload,
                keys=sc.keys,
                clients_per_node=sc.clients_per_node,
                rate=sc.rate,
                op_timeout=sc.op_timeout,
                seed=sc.seed,
                delete_fraction=sc.delete_fraction,
                conflict_keys=sc.conflict_keys,
                levels=sc.read_levels,
                roam=sc.roam,
                max_staleness_ms=max(1, round(sc.max_staleness * 1000)),
                own_keys=sc.own_keys,
                pipelined=sc.client_path == "pipelined",
            ),
            self.cluster.endpoints,
            self.recorder,
            self.nemesis.side_of,
            client_prefix=f"{self.store}-c",
        )
        self._digest_file = open(self.digests_path, "w", encoding="utf-8")  # noqa: SIM115
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sample_digests()))
        self._tasks.append(loop.create_task(self.workload.run(self._stop)))

    def _workload(self) -> Workload:
        if self.workload is None:
            raise RuntimeError("begin() was not called")
        return self.workload

    async def sleep_until(self, t_s: float) -> None:
        """Sleep until ``t_s`` seconds after t0."""
        delay = t_s - _now_s(self.t0_ns)
        if delay > 0:
            await asyncio.sleep(delay)

    async def act(self, fault: Fault) -> dict[str, Any]:
        """Execute one fault action, recorded in the history as process ``nemesis``."""
        assert self.nemesis is not None and self.recorder is not None
        nem, rec = self.nemesis, self.recorder
        spec: dict[str, Json] = {"action": fault.action}
        for k in ("shape", "target", "mode"):
            v = getattr(fault, k)
            if v is not None:
                spec[k] = v
        if fault.groups:
            spec["groups"] = [list(g) for g in fault.groups]
        if fault.action == "clock-skew":
            spec["skew_ms"] = fault.skew_ms
        rec.invoke(NEMESIS, fault.action, None, spec)
        t_start = _now_s(self.t0_ns)
        try:
            desc = await self._execute(nem, fault)
        except (errors.StoreError, ValueError, RuntimeError, TimeoutError, OSError) as e:
            err = f"{type(e).__name__}: {e}"
            rec.complete("info", NEMESIS, spec, error=err[:300])
            entry = {"at_s": fault.at, "t_s": t_start, "action": fault.action, "error": err}
            self.faults.append(entry)
            return entry
        rec.complete("ok", NEMESIS, _jsonable(desc))
        entry = {
            "at_s": fault.at,
            "t_s": round(t_start, 6),
            "done_s": round(_now_s(self.t0_ns), 6),
            "action": fault.action,
            "description": desc,
        }
        self.faults.append(entry)
        return entry

    async def _execute(self, nem: Nemesis, f: Fault) -> dict[str, Any]:
        if f.action == "partition":
            assert f.shape is not None
            return await nem.partition(
                f.shape,
                groups=f.groups,
                target=f.target,
                mode=LinkMode(f.mode) if f.mode else None,
                delay_ms=f.delay_ms,
                jitter_ms=f.jitter_ms,
            )
        if f.action == "heal":
            return await nem.heal()
        if f.action == "kill":
            return await nem.kill(f.target or "random")
        if f.action == "restart":
            return await nem.restart(f.target or "killed")
        if f.action == "pause":
            return await nem.pause(f.target or "random")
        if f.action == "resume":
            return await nem.resume(f.target or "paused")
        if f.action == "clock-skew":
            return await nem.clock_skew(f.target or "random", f.skew_ms)
        raise ValueError(f"unknown action {f.action!r}")

    async def run_timeline(self) -> None:
        """Execute the scenario's faults at their times, then wait for the end."""
        for fault in self.scenario.faults:
            await self.sleep_until(fault.at)
            await self.act(fault)
        await self.sleep_until(self.scenario.duration)

    async def end(self) -> None:
        """Stop the clients, undo faults, wait for convergence, read every counter."""
        assert self.nemesis is not None and self.recorder is not None
        assert self.cluster is not None
        self._stop.set()
        if len(self._tasks) > 1:
            await self._tasks[1]
        self.end_s = _now_s(self.t0_ns)
        await self._recover()
        self.converged_s = await self._wait_converged(self.scenario.converge_timeout)
        if self.scenario.workload in ("counter", "both"):
            self.final_reads = await final_counter_reads(
                self.cluster.endpoints,
                counter_keys(self.scenario.keys),
                self.recorder,
                first_process=FINAL_READ_PROCESS,
            )
        if self.store == "gossip" and (
            self.scenario.workload in ("register", "both") or self.scenario.conflict_keys
        ):
            # the converged value of every register decides which writes lost (LWW)
            self.final_registers = await final_register_reads(
                self.cluster.endpoints,
                self._workload().register_names(),
                self.recorder,
                first_process=FINAL_REGISTER_READ_PROCESS,
            )
        if self.store == "gossip" and self.scenario.tombstone_timeout > 0:
            self.tombstones_collected_s = await self._wait_tombstones(
                self.scenario.tombstone_timeout
            )
        if not await self._stop_sampler(agreeing_within=self.scenario.converge_timeout):
            await self._dump_states()  # the replicas disagree at the end: keep the evidence
        self.recorder.close()

    def _agree(self, digests: dict[str, str | None]) -> bool:
        """Whether a sample has every node answering with one and the same digest."""
        return (
            self.cluster is not None
            and len(digests) == len(self.cluster.nodes)
            and None not in digests.values()
            and len(set(digests.values())) == 1
        )

    async def _dump_states(self) -> None:
        """Every node's Status and whole state (Cluster.Dump) into ``dumps/<node>.json``."""
        assert self.cluster is not None and self._status_client is not None
        from google.protobuf.json_format import MessageToDict

        out = self.dir / "dumps"
        out.mkdir(exist_ok=True)
        for node, ep in self.cluster.endpoints.items():
            doc: dict[str, Any] = {"node": node}
            try:
                status = await self._status_client.status(endpoint=ep)
                doc["status"] = MessageToDict(status)
                doc["entries"] = [
                    MessageToDict(e) for e in await self._status_client.dump(endpoint=ep)
                ]
            except errors.StoreError as e:
                doc["error"] = f"{e.code.name}: {e.message}"
            (out / f"{node}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    async def _recover(self) -> list[tuple[str, dict[str, Any]]]:
        assert self.nemesis is not None
        done: list[tuple[str, dict[str, Any]]] = []
        nem = self.nemesis
        pending: list[Fault] = []
        t = _now_s(self.t0_ns)
        if nem.current is not None or (self.net is not None and self.net.blocked()):
            pending.append(Fault(t, "heal"))
        if nem.paused:
            pending.append(Fault(t, "resume", target="paused"))
        if nem.killed:
            pending.append(Fault(t, "restart", target="killed"))
        if any(nem.skews.values()):
            pending.append(Fault(t, "clock-skew", target="skewed", skew_ms=0))
        for f in pending:
            done.append((f.action, await self.act(f)))
        return done

    async def _wait_converged(self, timeout: float) -> float | None:
        """Seconds since t0 when every node reported the same digest in two consecutive
        samples taken after this call (None: not within ``timeout``)."""
        deadline = time.monotonic() + timeout
        since = time.monotonic_ns() - self.t0_ns
        seen = self._samples_taken
        agreeing = 0
        first_agree: float | None = None
        while time.monotonic() < deadline:
            if self._samples_taken != seen:
                seen = self._samples_taken
                if self._latest_time_ns > since and self._agree(self._latest_digests):
                    agreeing += 1
                    if first_agree is None:
                        first_agree = self._latest_time_ns / 1e9
                    if agreeing >= 2:
                        return first_agree
                else:
                    agreeing, first_agree = 0, None
            await asyncio.sleep(SAMPLE_INTERVAL_S / 4)
        return None

    async def _wait_tombstones(self, timeout: float) -> float | None:
        """Seconds since t0 of the first of two consecutive samples (taken after this call)
        in which every node reported 0 tombstones (None: not within ``timeout``)."""
        deadline = time.monotonic() + timeout
        seen = self._samples_taken
        first: float | None = None
        while time.monotonic() < deadline:
            if self._samples_taken != seen:
                seen = self._samples_taken
                held = self._latest_tombstones
                if held and all(v == 0 for v in held.values()):
                    if first is not None:
                        return first
                    first = self._latest_time_ns / 1e9
                else:
                    first = None
            await asyncio.sleep(SAMPLE_INTERVAL_S / 4)
        return None

    async def _sample_digests(self) -> None:
        """Every ~100 ms each node's Status into ``digests.jsonl``; every ~250 ms, while the
        store holds at most :data:`DUMP_MAX_KEYS` keys, also each node's Dump: how many keys
        the replicas disagree on and (gossip) what each node has seen of every key
        (:mod:`harness.divergence`)."""
        assert self.cluster is not None and self._status_client is not None
        from harness.divergence import differing_keys, dump_views

        client, eps = self._status_client, self.cluster.endpoints

        async def one(node: str) -> tuple[str, Any]:
            try:
                return node, await asyncio.wait_for(client.status(endpoint=eps[node]), 0.6)
            except (errors.StoreError, TimeoutError):
                return node, None

        async def dump(node: str) -> tuple[str, Any]:
            try:
                return node, await asyncio.wait_for(client.dump(endpoint=eps[node]), 1.0)
            except errors.StoreError as e:  # NOT_FOUND: nothing to dump
                return node, [] if e.code.name == "NOT_FOUND" else None
            except TimeoutError:
                return node, None

        next_at = time.monotonic()
        last_dump = -math.inf
        most_keys: int | None = None  # keys of the fullest node at the last sample
        while not self._sampling.is_set():
            t_ns = max(0, time.monotonic_ns() - self.t0_ns)
            # the dumps, when due, run alongside the Status calls: a sample takes the longer
            # of the two, not their sum
            dumping = (
                most_keys is not None
                and most_keys <= DUMP_MAX_KEYS
                and time.monotonic() - last_dump >= DUMP_INTERVAL_S
            )
            if dumping:
                last_dump = time.monotonic()
            status_and_dumps = await asyncio.gather(
                *(one(n) for n in eps), *(dump(n) for n in eps if dumping)
            )
            answers, dumped = status_and_dumps[: len(eps)], status_and_dumps[len(eps) :]
            digests: dict[str, str | None] = {}
            sample: dict[str, Any] = {"time_ns": t_ns, "digests": digests}
            leaders: dict[str, str | None] = {}
            terms: dict[str, int | None] = {}
            applied: dict[str, int | None] = {}
            tombs: dict[str, int | None] = {}
            collected: dict[str, int | None] = {}
            for node, st in answers:
                digests[node] = st.state_digest.hex() if st is not None else None
                leaders[node] = (st.leader_id or None) if st is not None else None
                terms[node] = st.term if st is not None else None
                applied[node] = st.applied_index if st is not None else None
                tombs[node] = st.counters.get("tombstones") if st is not None else None
                collected[node] = (
                    st.counters.get("tombstones_collected") if st is not None else None
                )
            if self.store == "raft":
                sample["leaders"] = leaders
                sample["terms"] = terms
                sample["applied"] = applied
            else:
                sample["tombstones"] = tombs
                sample["tombstones_collected"] = collected
            most_keys = max((st.keys for _, st in answers if st is not None), default=None)
            if dumping:
                dumps = {n: entries for n, entries in dumped if entries is not None}
                sample["dump_ms"] = round((time.monotonic() - last_dump) * 1000, 1)
                # only when every node's Dump answered: two agreeing nodes say nothing of a
                # third that was paused or slow
                whole = len(dumps) == len(eps) > 1
                sample["differing_keys"] = differing_keys(dumps) if whole else None
                if self.store != "raft":
                    sample["seen"] = {n: dump_views(entries) for n, entries in dumps.items()}
            self._latest_digests = digests
            self._latest_tombstones = tombs
            self._latest_time_ns = t_ns
            self._samples_taken += 1
            if self._digest_file is not None:
                self._digest_file.write(json.dumps(sample, separators=(",", ":")) + "\n")
            self._agreeing_run = self._agreeing_run + 1 if self._agree(digests) else 0
            stop_by = self._stop_agreeing_by
            if stop_by is not None and (self._agreeing_run >= 2 or time.monotonic() >= stop_by):
                return  # the last sample written ends an agreeing pair (or the time is up)
            next_at += SAMPLE_INTERVAL_S
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sampling.wait(), delay)

    async def _stop_sampler(self, *, agreeing_within: float = 0.0) -> bool:
        """Stop the digest sampler; with ``agreeing_within`` > 0, let it first sample (up to
        that long) until two consecutive samples agree, so the file ends on agreement if the
        replicas agree at all. Returns whether the last two samples agreed.

        The convergence checker reads the tail of the samples ("agree for good"). A node's
        background write after the workload (a stable mark, a collection) briefly makes the
        replicas differ, and a sample in flight when the sampler was told to stop was still
        written: the run ended on that sample and failed "did not converge" (seed 6 of
        gossip-crash-restart-short; a spectrum run in CI). Only the sampler itself can say
        which sample is its last, so it stops itself, right after an agreeing pair."""
        task = self._tasks[0] if self._tasks else None
        if agreeing_within > 0 and task is not None and not task.done():
            self._stop_agreeing_by = time.monotonic() + agreeing_within
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), agreeing_within + 5.0)
        self._sampling.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5.0)
        if self._digest_file is not None:
            self._digest_file.close()
            self._digest_file = None
        return self._agreeing_run >= 2

    async def close(self) -> None:
        """Stop everything this run started; safe to call more than once and on errors."""
        self._stop.set()
        self._sampling.set()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self._digest_file is not None:
            self._digest_file.close()
            self._digest_file = None
        if self.recorder is not None:
            self.recorder.close()
        if self.cluster is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.close)
        if self.nemesis is not None:
            await self.nemesis.close()
        if self._status_client is not None:
            await self._status_client.close()
        if self.net is not None:
            await self.net.close()


def _jsonable(obj: Any) -> Json:
    result: Json = json.loads(json.dumps(obj, default=str))
    return result


# -- analysis ---------------------------------------------------------------------------
@dataclass(slots=True)
class _Counts:
    ok: int = 0
    fail: int = 0
    info: int = 0
    refused_unsupported: int = 0  # FAILED_PRECONDITION: the store does not offer the op

    def add(self, op: Operation) -> None:
        if op.type == "ok" or (op.type == "fail" and (op.error or "").startswith("compare")):
            self.ok += 1  # a failed compare is an answer: the store was available
        elif op.type == "fail" and (op.error or "").startswith("FAILED_PRECONDITION"):
            self.refused_unsupported += 1
        elif op.type == "fail":
            self.fail += 1
        else:
            self.info += 1

    def to_json(self) -> dict[str, Any]:
        total = self.ok + self.fail + self.info
        return {
            "ok": self.ok,
            "fail": self.fail,
            "info": self.info,
            "unsupported": self.refused_unsupported,
            "availability": round(self.ok / total, 4) if total else None,
        }


def _latency(ops: Sequence[Operation]) -> dict[str, Any]:
    h = HdrHistogram(1, 120_000_000, 3)  # microseconds, 1 us .. 120 s
    for op in ops:
        if op.type == "ok" and not math.isinf(op.complete_time):
            h.record_value(max(1, int((op.complete_time - op.invoke_time) / 1000)))
    n = h.get_total_count()
    if not n:
        return {"count": 0}
    return {
        "count": n,
        "p50_ms": h.get_value_at_percentile(50) / 1000,
        "p95_ms": h.get_value_at_percentile(95) / 1000,
        "p99_ms": h.get_value_at_percentile(99) / 1000,
        "max_ms": h.get_max_value() / 1000,
    }


def analyze(
    ops: Sequence[Operation], faults: Sequence[Mapping[str, Any]], duration_s: float
) -> dict[str, Any]:
    """Availability (overall, per phase, per side), latency and throughput of client ops."""
    client_ops = [
        op
        for op in ops
        if op.process != NEMESIS and isinstance(op.process, int) and op.process < FINAL_READ_PROCESS
    ]
    window = fault_window(faults)
    phases = {"before": _Counts(), "during": _Counts(), "after": _Counts()}
    sides: dict[str, _Counts] = {}
    overall = _Counts()
    per_f: dict[str, _Counts] = {}
    for op in client_ops:
        t = op.invoke_time / 1e9
        overall.add(op)
        per_f.setdefault(op.f, _Counts()).add(op)
        if window is None or t < window[0]:
            phases["before"].add(op)
        elif t < window[1]:
            phases["during"].add(op)
        else:
            phases["after"].add(op)
        if op.side is not None:
            sides.setdefault(op.side, _Counts()).add(op)
    oks = [op for op in client_ops if op.type == "ok"]
    span = {
        "before": (0.0, window[0] if window else duration_s),
        "during": (window[0], window[1]) if window else (0.0, 0.0),
        "after": (window[1], duration_s) if window else (0.0, 0.0),
    }
    throughput: dict[str, Any] = {
        "ok_per_s": round(len(oks) / duration_s, 2) if duration_s else None,
        "ops_per_s": round(len(client_ops) / duration_s, 2) if duration_s else None,
    }
    for name, (a, b) in span.items():
        n = sum(1 for op in oks if a <= op.invoke_time / 1e9 < b)
        throughput[f"ok_per_s_{name}"] = round(n / (b - a), 2) if b > a else None
    return {
        "fault_window_s": list(window) if window else None,
        "availability": {
            "overall": overall.to_json(),
            "phases": {k: v.to_json() for k, v in phases.items()},
            "sides": {k: v.to_json() for k, v in sorted(sides.items())},
            "by_function": {k: v.to_json() for k, v in sorted(per_f.items())},
        },
        "latency": {
            "all": _latency(client_ops),
            **{f: _latency([op for op in client_ops if op.f == f]) for f in sorted(per_f)},
        },
        "throughput": throughput,
        "operations": len(client_ops),
    }


def read_digests(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


def divergence(
    samples: Sequence[Mapping[str, Any]], window: tuple[float, float] | None
) -> dict[str, Any]:
    """Digest figures from the ~100 ms samples.

    ``max_distinct_digests_during``: most distinct digests seen in one sample inside the
    fault window (2+ = the replicas diverged). ``first_agreement_after_heal_s``: seconds from
    the window's end to the first sample where every node answered with the same digest.
    ``stable_agreement_at_s``: time of the first sample after the last disagreement (while
    clients still write, replicas disagree briefly all the time, so this is an upper bound).
    """
    max_during = 0
    last_disagree: float | None = None
    first_after: float | None = None
    for s in samples:
        t = s["time_ns"] / 1e9
        values = list(s["digests"].values())
        ds = {d for d in values if d is not None}
        if window is not None and window[0] <= t <= window[1]:
            max_during = max(max_during, len(ds))
        agree = len(ds) == 1 and None not in values
        if not agree:
            last_disagree = t
        elif window is not None and first_after is None and t >= window[1]:
            first_after = t
    stable: float | None = None
    for s in samples:
        if last_disagree is None or s["time_ns"] / 1e9 > last_disagree:
            stable = s["time_ns"] / 1e9
            break
    return {
        "max_distinct_digests_during": max_during,
        "first_agreement_after_heal_s": (
            round(first_after - window[1], 3)
            if first_after is not None and window is not None
            else None
        ),
        "stable_agreement_at_s": round(stable, 3) if stable is not None else None,
        "samples": len(samples),
    }


def check_store(run: StoreRun) -> dict[str, Any]:
    """Run the checkers on a finished :class:`StoreRun`; write and return its results."""
    events = read_history(run.history_path)
    ops = pair_operations(events)
    sc = run.scenario
    figures = analyze(ops, run.faults, sc.duration)
    fw = figures["fault_window_s"]
    window: tuple[float, float] | None = (fw[0], fw[1]) if fw else None
    samples = read_digests(run.digests_path) if run.digests_path.exists() else []
    digest = divergence(samples, window)
    checkers = run_checkers(
        run.store,
        ops,
        samples,
        window,
        run.final_reads,
        run.final_registers,
        nodes=sc.node_ids,
        end_s=run.end_s,
        tombstone_timeout=sc.tombstone_timeout,
    )
    verdicts = [c.get("valid") for c in checkers.values()]
    valid: bool | str = True
    if any(v is False for v in verdicts):
        valid = False
    elif any(v == "unknown" for v in verdicts):
        valid = "unknown"
    results = {
        "schema_version": SCHEMA_VERSION,
        "store": run.store,
        "scenario": sc.summary(),
        "t0_unix_ns": run.t0_unix_ns,
        "t0_monotonic_ns": run.t0_ns,
        "valid": valid,
        "timings": {
            "duration_s": sc.duration,
            "workload_end_s": run.end_s,
            "fault_window_s": figures.pop("fault_window_s"),
            "faults": run.faults,
            "converged_s": run.converged_s,
            "convergence_after_stop_s": (
                round(run.converged_s - run.end_s, 3)
                if run.converged_s is not None and run.end_s is not None
                else None
            ),
            "tombstones_collected_s": run.tombstones_collected_s,
        },
        "checkers": checkers,
        # who was authenticated (issue 14): the nodes to each other; clients on loopback
        "security": {
            "peers": "mutual TLS" if run.cluster is not None and run.cluster.secure else "none",
            "clients": "plaintext on loopback",
        },
        "digests": digest,
        "final_reads": run.final_reads,
        "final_registers": run.final_registers,
        **figures,
        "files": {
            "history": str(run.history_path),
            "digests": str(run.digests_path),
            "logs": str(run.dir / "logs"),
        },
    }
    (run.dir / "results.json").write_text(
        json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    return results


@dataclass(slots=True)
class RunResult:
    """What :func:`run_scenario` produced."""

    scenario: Scenario
    out_dir: Path
    t0_unix_ns: int
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)  # store -> results.json

    @property
    def valid(self) -> bool | str:
        vs = [r["valid"] for r in self.stores.values()]
        if any(v is False for v in vs):
            return False
        if any(v == "unknown" for v in vs):
            return "unknown"
        return True

    @property
    def results_path(self) -> Path:
        return self.out_dir / "results.json"


async def run_async(
    scenario: Scenario, stores: Sequence[str], out_dir: Path, *, secure: bool = True
) -> RunResult:
    """Run ``scenario`` on ``stores`` side by side (common t0) and check them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # results.json marks a finished run (the report reads it): an old one must not vouch
    # for this run, which writes "status": "interrupted"/"failed" if it does not finish
    (out_dir / "results.json").unlink(missing_ok=True)
    runs = [StoreRun(scenario, s, out_dir, secure=secure) for s in stores]
    try:
        await asyncio.gather(*(r.setup() for r in runs))
        t0 = time.monotonic_ns()
        t0_unix = time.time_ns()
        for r in runs:
            r.begin(t0, t0_unix)

        async def drive(r: StoreRun) -> None:
            await r.run_timeline()
            await r.end()

        await asyncio.gather(*(drive(r) for r in runs))
    except BaseException as e:
        cut = isinstance(e, KeyboardInterrupt | asyncio.CancelledError)
        status = {
            "status": "interrupted" if cut else "failed",
            "error": repr(e)[:500],
            "scenario": scenario.summary(),
        }
        with contextlib.suppress(OSError):
            (out_dir / "results.json").write_text(
                json.dumps({"schema_version": SCHEMA_VERSION, **status}) + "\n", encoding="utf-8"
            )
        raise
    finally:
        await asyncio.shield(asyncio.gather(*(r.close() for r in runs)))
    result = RunResult(scenario, out_dir, t0_unix)
    for r in runs:
        result.stores[r.store] = check_store(r)
    combined = {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario.summary(),
        "t0_unix_ns": t0_unix,
        "status": "complete",
        "valid": result.valid,
        "stores": result.stores,
    }
    result.results_path.write_text(
        json.dumps(_jsonable(combined), indent=2) + "\n", encoding="utf-8"
    )
    return result


def run_scenario(
    scenario: Scenario, store: str, out_dir: Path | str, *, secure: bool = True
) -> RunResult:
    """Blocking entry point: ``store`` is ``raft``, ``gossip`` or ``both``; ``secure``:
    mutual TLS between the nodes (False: ``--insecure``). SIGTERM and Ctrl-C stop the run
    and every node before returning (KeyboardInterrupt propagates)."""
    stores = ("raft", "gossip") if store == "both" else (store,)

    async def main() -> RunResult:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run_async(scenario, stores, Path(out_dir), secure=secure)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


__all__ = [
    "FAULT_ACTIONS",
    "FINAL_READ_PROCESS",
    "FINAL_REGISTER_READ_PROCESS",
    "RECOVERY_ACTIONS",
    "counter_verdict",
    "fault_window",
    "final_reads_from_history",
    "run_checkers",
]
