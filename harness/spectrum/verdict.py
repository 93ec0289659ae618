"""Layer 3 of the spectrum report: the matrix in words (a verdict read in five seconds).

One headline (every promise kept, or which were broken), then a few sentences per store
picked from the numbers: what the strongest level offered cost on the minority, how stale
the weakest reads got, which anomalies each weaker level let through, and how the session
levels treated clients that stayed with their node versus clients that moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.spectrum.matrix import CHECKER_NAMES, Availability, Cell, Matrix

LEVEL_NAMES: dict[str, str] = {
    "strong": "STRONG",
    "bounded_staleness": "BOUNDED_STALENESS",
    "session": "SESSION",
    "read_my_writes": "READ_MY_WRITES",
    "monotonic_reads": "MONOTONIC_READS",
    "consistent_prefix": "CONSISTENT_PREFIX",
    "eventual": "EVENTUAL",
}
SESSION_LEVELS = ("session", "read_my_writes", "monotonic_reads")


@dataclass(frozen=True, kw_only=True)
class Verdict:
    ok: bool  # every promise kept (and nothing unexplained)
    headline: str
    lines: dict[str, list[str]]  # store -> sentences


def _share(a: Availability | None) -> str:
    if a is None or not a.total:
        return "no reads"
    return f"{100 * a.ok / a.total:.0f}% of {a.total}"


def _joined(av: dict[str, Availability]) -> Availability:
    return Availability(ok=sum(a.ok for a in av.values()), total=sum(a.total for a in av.values()))


def _ms(x: float) -> str:
    return f"{x / 1000:.1f} s" if x >= 1000 else f"{x:.0f} ms"


def _anomaly_list(cell: Cell) -> str:
    words = {
        "linearizable": "stale (non-linearizable) reads",
        "bounded_staleness": "beyond the claimed staleness bound",
    }
    found = [f"{cell.anomalies[c].count} {words.get(c, CHECKER_NAMES[c])}" for c in cell.permitted]
    return ", ".join(found) if found else "no anomaly"


def _during(c: Cell, kind: str) -> Availability:
    return _joined({side: av[kind] for side, av in c.availability.items() if kind in av})


def store_lines(m: Matrix, store: str) -> list[str]:
    cells = m.cells[store]
    offered = [c for c in cells.values() if c.offered]
    out: list[str] = []
    refused = [LEVEL_NAMES[lv] for lv, c in cells.items() if not c.offered]
    if refused:
        out.append(f"refuses {', '.join(refused)} outright (FAILED_PRECONDITION, with the reason).")
    if offered and offered[0].level != "bounded_staleness" and offered[0].availability:
        c = offered[0]
        minority = _joined(c.availability.get("minority", {}))
        majority = _joined(c.availability.get("majority", {}))
        lat = f"; read p50 {c.latency_ms[0]:.0f} ms" if c.latency_ms else ""
        out.append(
            f"{LEVEL_NAMES[c.level]} answered {_share(majority)} reads on the majority and "
            f"{_share(minority)} on the minority during the partition{lat}."
        )
    bounded = cells.get("bounded_staleness")
    if bounded is not None and bounded.offered and bounded.availability:
        out.append(
            f"BOUNDED_STALENESS ({m.bound_ms:.0f} ms; the store claims {bounded.bound_ms:.0f}) "
            f"answered {_share(_joined(bounded.availability.get('majority', {})))} reads on "
            f"the majority and {_share(_joined(bounded.availability.get('minority', {})))} on "
            "the minority during the partition."
        )
    for lv in SESSION_LEVELS:
        sc = cells.get(lv)
        if sc is None or not sc.offered or not sc.availability:
            continue
        c = sc
        out.append(
            f"{LEVEL_NAMES[lv]} kept its promise; during the partition it served "
            f"{_share(_during(c, 'sticky'))} reads of clients that stayed with their node and "
            f"{_share(_during(c, 'roaming'))} of clients that moved between nodes (sticky "
            f"availability); it let through {_anomaly_list(c)}."
            if not c.broken
            else f"{LEVEL_NAMES[lv]} BROKE its promise (listed first)."
        )
        break
    prefix = cells.get("consistent_prefix")
    if prefix is not None and prefix.kept:
        out.append(
            f"CONSISTENT_PREFIX showed no gap in any replica's order; it let through "
            f"{_anomaly_list(prefix)}."
        )
    if offered and offered[-1].staleness is not None:
        w = offered[-1]
        st = w.staleness
        assert st is not None
        out.append(
            f"reads that guaranteed only {LEVEL_NAMES[w.level]} returned values up to "
            f"{_ms(st.max_ms)} old ({st.versions_behind_max} versions behind; p99 "
            f"{_ms(st.p99_ms)}), with {_anomaly_list(w)}."
        )
    conv = m.converged.get(store)
    if conv is not None:
        after = m.converge_s.get(store)
        out.append(
            "the replicas "
            + (
                f"converged {after:.2f} s after the workload stopped (eventual consistency)."
                if conv and after is not None
                else "converged at the end (eventual consistency)."
                if conv
                else "did NOT converge at the end."
            )
        )
    return out


def broken_promises(m: Matrix) -> list[str]:
    out: list[str] = []
    for store in m.stores:
        for lv, c in m.cells[store].items():
            for check in c.broken:
                a = c.anomalies[check]
                out.append(
                    f"{store} {LEVEL_NAMES[lv]}: {a.count} {CHECKER_NAMES[check]} "
                    f"violation(s), e.g. {a.example}"
                )
            if c.unexplained:
                out.append(
                    f"{store} {LEVEL_NAMES[lv]}: {c.unexplained} read(s) of unwritten values"
                )
        if m.converged.get(store) is False:
            out.append(f"{store}: the replicas did not converge")
    return out


def verdict(m: Matrix) -> Verdict:
    broken = broken_promises(m)
    cells = [c for s in m.stores for c in m.cells[s].values()]
    served = sum(1 for c in cells if c.kept is not None)
    unmeasured = [
        f"{c.store} {LEVEL_NAMES[c.level]}" for c in cells if c.offered and c.kept is None
    ]
    if broken:
        headline = f"PROMISE BROKEN: {len(broken)} guarantee(s) violated"
    else:
        headline = (
            f"Every promise kept: {served} served (store, level) pairs, 0 violations of "
            "what each level guarantees; the weaker levels show the anomalies they permit."
        )
    if unmeasured:
        headline += f" Not measured (nothing to judge): {', '.join(unmeasured)}."
    return Verdict(
        ok=not broken,
        headline=headline,
        lines={s: store_lines(m, s) for s in m.stores} | ({"broken": broken} if broken else {}),
    )


def plain(v: Verdict, stores: Sequence[str]) -> str:
    """The verdict as terminal text (broken promises first)."""
    out = [v.headline]
    for s in ["broken", *stores]:
        if s in v.lines:
            out.append(f"{s}:")
            out += [f"  - {line}" for line in v.lines[s]]
    return "\n".join(out)
