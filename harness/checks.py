"""The checker dispatch: which checkers run on a store's history, and their JSON figures.

Theory of operation
-------------------
One module decides what is checked, used by both the runner (right after a run, with the
final reads it made) and the report (:func:`checkers_from_history`, when a run folder has
no ``results.json``: the final reads are taken back from the history). It imports only the
history and the checkers, never the runner or the report.

:func:`run_checkers` returns ``{name: {"valid": ..., ...figures}}``: raft, linearizability
of the registers and stale LOCAL reads; gossip, the final state of the registers, tombstone
collection, stale reads and the acknowledged writes last-writer-wins discarded (``lww_losers``
with ``discards``, each a :class:`harness.divergence.LwwDiscard` as JSON); both, counter
bounds and convergence. The convergence checker's ``time_to_converge_s`` is
:func:`harness.divergence.time_to_converge` after the last heal: the one definition of
time-to-converge that the report's table and verdict show as well.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from harness.history import NEMESIS, Json, Operation

FINAL_READ_PROCESS = 1_000_000  # process ids of the final (LOCAL, after the run) reads
FINAL_REGISTER_READ_PROCESS = FINAL_READ_PROCESS + 1000  # ... of registers (gossip only)
FAULT_ACTIONS = frozenset({"partition", "kill", "pause"})
RECOVERY_ACTIONS = frozenset({"heal", "restart", "resume"})


def fault_window(faults: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """(start, end) in seconds: the first fault action to the last recovery action."""
    starts = [f["t_s"] for f in faults if f["action"] in FAULT_ACTIONS and "error" not in f]
    skews = [f for f in faults if f["action"] == "clock-skew" and "error" not in f]
    starts += [f["t_s"] for f in skews if (f.get("description") or {}).get("skew_ms")]
    if not starts:
        return None
    start = min(starts)
    ends = [
        f.get("done_s", f["t_s"])
        for f in faults
        if f["t_s"] >= start
        and (
            f["action"] in RECOVERY_ACTIONS
            or (f["action"] == "clock-skew" and not (f.get("description") or {}).get("skew_ms"))
        )
    ]
    end = max(ends) if ends else max(f["t_s"] for f in faults)
    return start, max(start, end)


def run_checkers(
    store: str,
    ops: Sequence[Operation],
    samples: Sequence[Mapping[str, Any]],
    window: tuple[float, float] | None,
    final_reads: Mapping[str, Mapping[str, int | None]],
    final_registers: Mapping[str, Mapping[str, str | None]] | None = None,
    *,
    nodes: Sequence[str] | None = None,
    end_s: float | None = None,
    tombstone_timeout: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Per-checker verdicts and figures. ``valid`` is True, False or "unknown"; checkers
    that only measure (stale reads, LWW losers) report ``valid: null``, as does the
    tombstone checker when the run did not wait for collection (``tombstone_timeout`` 0).
    ``nodes``: every node whose final register reads must be there (default: those read);
    ``end_s``: when the workload stopped (default: the last client operation's invoke)."""
    out: dict[str, dict[str, Any]] = {}
    register_ops = [op for op in ops if op.f in ("read", "write", "cas", "delete")]
    if register_ops and store == "raft":
        out["linearizable"] = _linearizable(register_ops)
    out.update(_extra_checkers(store, ops, samples, window, final_reads))
    if store == "gossip":
        if final_registers:
            out["final_state"] = _final_state(ops, final_registers, nodes)
        if any("tombstones" in s for s in samples):
            if end_s is None:
                client = [o.invoke_time for o in ops if _is_client(o)]
                end_s = max(client, default=0) / 1e9
            out["tombstones"] = _tombstones(ops, samples, end_s, tombstone_timeout)
        out.update(_staleness(ops, final_registers or {}))
    else:
        out["stale_local_reads"] = _stale_reads_figures(ops, ("read-local",))
    return out


def checkers_from_history(
    store: str,
    all_ops: Sequence[Operation],
    samples: Sequence[Mapping[str, Any]],
    window: tuple[float, float] | None,
    *,
    end_s: float | None = None,
    complete: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`run_checkers` on a recorded history alone (no runner at hand): the final
    counter and register reads are the ones recorded in it. ``complete`` False (the run was
    interrupted): only the checkers that hold on any prefix of a history run (linearizability,
    counter bounds of the reads, stale reads); convergence, final state and tombstones need
    the end of the run (heal, final reads) and are left out."""
    finals = final_reads_from_history(all_ops)
    by_node: dict[str, dict[str, int | None]] = {}
    for key, per_node in finals.items():
        for node, v in per_node.items():
            by_node.setdefault(node, {})[key] = v
    registers: dict[str, dict[str, str | None]] = {}
    for op in all_ops:
        if (
            op.f == "read"
            and op.type == "ok"
            and isinstance(op.process, int)
            and op.process >= FINAL_REGISTER_READ_PROCESS
            and op.node is not None
            and op.key is not None
            and (op.result is None or isinstance(op.result, str))
        ):
            registers.setdefault(op.node, {})[op.key] = op.result
    ops = [op for op in all_ops if op.process != NEMESIS]
    out = run_checkers(store, ops, samples, window, by_node, registers, end_s=end_s)
    if not complete:
        for name in ("convergence", "final_state", "tombstones"):
            out.pop(name, None)
    return out


def _is_client(op: Operation) -> bool:
    return isinstance(op.process, int) and op.process < FINAL_READ_PROCESS


def _final_state(
    ops: Sequence[Operation],
    final_registers: Mapping[str, Mapping[str, str | None]],
    nodes: Sequence[str] | None,
) -> dict[str, Any]:
    """No acknowledged delete undone, the last acknowledged write on every replica."""
    from harness.checker.final_state import check_final_registers, describe_write

    res = check_final_registers([o for o in ops if _is_client(o)], final_registers, nodes)
    return {
        "valid": res.valid,
        "keys": len(res.keys),
        "acknowledged_writes": res.acknowledged,
        "acknowledged_deletes": res.deletes_acknowledged,
        "deleted_keys": list(res.deleted_keys),
        "verdicts": {k: r.verdict for k, r in res.keys.items()},
        "last_writes": {
            k: None if r.last is None else describe_write(r.last) for k, r in res.keys.items()
        },
        "violations": [f"{k.key}: {k.verdict}: {k.reason}" for k in res.violations],
        "summary": res.summary(),
    }


def _tombstones(
    ops: Sequence[Operation],
    samples: Sequence[Mapping[str, Any]],
    end_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Tombstones held and collected (Status counters), and whether all went in time."""
    from harness.checker.tombstones import check_tombstones

    res = check_tombstones(samples, int(end_s * 1e9), timeout_s=timeout_s)
    deletes = [o for o in ops if _is_client(o) and o.f == "delete"]
    at = res.all_collected_at_ns
    return {
        "valid": res.valid,
        "acknowledged_deletes": sum(1 for o in deletes if o.type == "ok"),
        "indeterminate_deletes": sum(1 for o in deletes if o.type == "info"),
        "max_held": res.max_held,
        "held_at_end": dict(res.held_at_end),
        "collected": dict(res.collected),
        "collected_total": res.collected_total,
        "all_collected_at_s": None if at is None else round(at / 1e9, 3),
        "all_collected_after_stop_s": None if at is None else round(at / 1e9 - end_s, 3),
        "waited_s": timeout_s,
        "summary": res.summary(),
    }


def _linearizable(ops: Sequence[Operation]) -> dict[str, Any]:
    from harness.checker.linearizable import check_register, describe, fmt_time

    res = check_register(ops, timeout_s=60.0)
    entry: dict[str, Any] = {
        "valid": res.valid,
        "operations": res.operations,
        "keys": len(res.per_key),
        "elapsed_s": round(res.elapsed_s, 3),
        "unknown_keys": list(res.unknown_keys),
        "summary": res.summary(),
    }
    cex = res.counterexample
    if cex is not None:
        entry["counterexample"] = {
            "key": cex.key,
            "op": f"{describe(cex.op)} by {cex.op.process} on {cex.op.node} at "
            f"{fmt_time(cex.op.invoke_time)}",
            "state": cex.state,
            "reason": cex.reason,
            "prefix_length": len(cex.prefix),
            "concurrent": [describe(o) for o in cex.concurrent],
        }
    return entry


def final_reads_from_history(ops: Sequence[Operation]) -> dict[str, dict[str, int]]:
    """key -> node -> value of the final counter reads recorded by the runner (processes
    from :data:`FINAL_READ_PROCESS` on)."""
    out: dict[str, dict[str, int]] = {}
    for op in ops:
        if (
            op.f == "read-counter"
            and op.type == "ok"
            and isinstance(op.process, int)
            and op.process >= FINAL_READ_PROCESS
            and op.key is not None
            and op.node is not None
            and isinstance(op.result, int)
        ):
            out.setdefault(op.key, {})[op.node] = op.result
    return out


def counter_verdict(
    ops: Sequence[Operation], final_reads: Mapping[str, Mapping[str, int]] | None = None
) -> dict[str, Any]:
    """Counter bounds per key (harness.checker.counter): final reads (key -> node -> value;
    default: taken from the history) and run-time reads within what the increments allow."""
    from harness.checker.counter import check_counter

    finals = final_reads if final_reads is not None else final_reads_from_history(ops)
    keys = sorted({op.key for op in ops if op.f in ("incr", "read-counter") and op.key})
    per_key: dict[str, Any] = {}
    lines: list[str] = []
    valid = True
    for key in keys:
        res = check_counter(ops, finals.get(key, {}), key=key)
        valid = valid and res.valid
        b = res.bounds
        per_key[key] = {
            "valid": res.valid,
            "acknowledged": b.acknowledged,
            "lower": b.lower,
            "upper": b.upper,
            "ok": b.ok_count,
            "info": b.info_count,
            "fail": b.fail_count,
            "final_reads": dict(res.final_reads),
            "reads_checked": res.reads_checked,
            "violations": [v.reason for v in (*res.violations, *res.read_violations)][:20],
        }
        lines.append(
            f"{key}: {'ok' if res.valid else 'VIOLATION'}; final reads "
            f"{dict(res.final_reads)} within [{b.lower}, {b.upper}] "
            f"({b.acknowledged} acknowledged)"
        )
        lines += [f"  {v}" for v in per_key[key]["violations"]]
    summary = f"counter: {valid} ({len(keys)} keys)"
    return {"valid": valid, "keys": per_key, "summary": "\n".join([summary, *lines])}


def _extra_checkers(
    store: str,
    ops: Sequence[Operation],
    samples: Sequence[Mapping[str, Any]],
    window: tuple[float, float] | None,
    final_reads: Mapping[str, Mapping[str, int | None]],
) -> dict[str, dict[str, Any]]:
    """Counter bounds and convergence."""
    from harness.checker.convergence import check_convergence
    from harness.divergence import lag_series, time_to_converge

    out: dict[str, dict[str, Any]] = {}
    if any(op.f in ("incr", "read-counter") for op in ops):
        by_key: dict[str, dict[str, int]] = {}
        for node, values in final_reads.items():
            for key, v in values.items():
                if v is not None:
                    by_key.setdefault(key, {})[node] = v
        out["counter"] = counter_verdict(ops, by_key)
    heal_ns = int(window[1] * 1e9) if window is not None else None
    conv = check_convergence(((int(s["time_ns"]), s["digests"]) for s in samples), heal_ns)
    ttc = None
    if window is not None:
        client = [op for op in ops if _is_client(op)]
        ttc = time_to_converge(lag_series(store, client, samples), window[1])
    out["convergence"] = {
        "valid": conv.converged,
        "max_divergence": conv.max_divergence,
        "heal_time_s": None if heal_ns is None else heal_ns / 1e9,
        # when every replica reported one digest for good (the verdict's condition)
        "digests_agree_for_good_at_s": (
            None if conv.converged_at_ns is None else conv.converged_at_ns / 1e9
        ),
        # harness.divergence.time_to_converge after the (last) heal: the one definition
        "time_to_converge_s": None if ttc is None else round(ttc, 3),
    }
    return out


def _stale_reads_figures(ops: Sequence[Operation], read_fs: tuple[str, ...]) -> dict[str, Any]:
    """Reads that returned a value older than a write completed before they began."""
    from harness.checker.staleness import stale_reads

    sr = stale_reads(ops, read_fs=read_fs)
    return {
        "valid": None,
        "read_functions": list(read_fs),
        "reads_checked": sr.reads_checked,
        "stale": sr.stale_count,
        "stale_fraction": round(sr.stale_count / sr.reads_checked, 4) if sr.reads_checked else None,
        "per_key": dict(sr.per_key),
        "max_lag_ms": sr.max_lag_ns / 1e6,
        "unexplained": len(sr.unexplained),
    }


def _staleness(
    ops: Sequence[Operation], final_registers: Mapping[str, Mapping[str, str | None]]
) -> dict[str, dict[str, Any]]:
    """Stale reads and LWW losers (harness.checker.staleness), and every acknowledged write
    last-writer-wins discarded (harness.divergence): measured, never failed."""
    from harness.checker.linearizable import describe
    from harness.checker.staleness import lww_losers
    from harness.divergence import lww_discards

    out: dict[str, dict[str, Any]] = {
        "stale_reads": _stale_reads_figures(ops, ("read", "read-local"))
    }
    finals: dict[str, Json] = {}
    disagreements: list[str] = []
    keys = sorted({k for values in final_registers.values() for k in values})
    for key in keys:
        seen = Counter(v[key] for v in final_registers.values() if key in v)
        if len(seen) > 1:
            disagreements.append(key)
        finals[key] = seen.most_common(1)[0][0]
    if finals:
        lw = lww_losers(ops, finals)
        discards = lww_discards([o for o in ops if _is_client(o)], finals)
        out["lww_losers"] = {
            "valid": None,
            "acknowledged_writes": lw.acknowledged,
            "losers": len(lw.losers),
            "lost": len(lw.lost),
            "superseded": lw.superseded,
            "per_key": dict(lw.per_key),
            "observed_before_lost": len(lw.observed),
            "final_values": finals,
            "final_disagreements": disagreements,
            "examples": [f"{describe(o)} by {o.process} on {o.node}" for o in lw.losers[:5]],
            "discards": [d.to_json() for d in discards],
        }
    return out
