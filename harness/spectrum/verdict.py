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
    found = [f"{cell.anomalies[c].count} {CHECKER_NAMES[c]}" for c in cell.permitted]
    return ", ".join(found) if found else "no anomaly"


def store_lines(m: Matrix, store: str) -> list[str]:
    cells = m.cells[store]
    out: list[str] = []
    refused = [LEVEL_NAMES[lv] for lv, c in cells.items() if not c.offered]
    if refused:
        out.append(f"refuses {', '.join(refused)} outright (FAILED_PRECONDITION, with the reason).")
    strongest = next((c for c in cells.values() if c.offered), None)
    if strongest is not None and strongest.availability:
        minority = _joined(strongest.availability.get("minority", {}))
        majority = _joined(strongest.availability.get("majority", {}))
        out.append(
            f"{LEVEL_NAMES[strongest.level]} answered {_share(majority)} reads on the "
            f"majority and {_share(minority)} on the minority during the partition; "
            f"read p50 {strongest.latency_ms[0]:.0f} ms."
            if strongest.latency_ms
            else f"{LEVEL_NAMES[strongest.level]} answered no read."
        )
    weakest = [c for c in cells.values() if c.offered and c.staleness is not None]
    if weakest:
        w = max(weakest, key=lambda c: c.staleness.max_ms if c.staleness else 0.0)
        st = w.staleness
        assert st is not None
        out.append(
            f"reads that guaranteed only {LEVEL_NAMES[w.level]} returned values up to "
            f"{_ms(st.max_ms)} old ({st.versions_behind_max} versions behind; p99 "
            f"{_ms(st.p99_ms)}): {_anomaly_list(w)}."
        )
    for lv in SESSION_LEVELS:
        c = cells.get(lv)
        if c is None or not c.offered or not c.availability:
            continue
        side = c.availability.get("minority", {})
        out.append(
            f"{LEVEL_NAMES[lv]} on the minority served {_share(side.get('sticky'))} reads "
            f"of clients that stayed with their node, {_share(side.get('roaming'))} of "
            f"clients that moved there; kept its promise with {_anomaly_list(c)} else."
        )
        break
    bounded = cells.get("bounded_staleness")
    if bounded is not None and bounded.offered and bounded.availability:
        out.append(
            f"BOUNDED_STALENESS ({m.bound_ms:.0f} ms; the store claims {bounded.bound_ms:.0f}) "
            f"answered {_share(_joined(bounded.availability.get('majority', {})))} on the "
            f"majority, {_share(_joined(bounded.availability.get('minority', {})))} on the "
            "minority during the partition."
        )
    conv = m.converged.get(store)
    if conv is not None:
        after = m.converge_s.get(store)
        out.append(
            "EVENTUAL: the replicas "
            + (
                f"agreed {after:.2f} s after the workload stopped."
                if conv and after is not None
                else "agreed at the end."
                if conv
                else "did NOT agree at the end."
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
    served = sum(1 for s in m.stores for c in m.cells[s].values() if c.offered)
    if broken:
        headline = f"PROMISE BROKEN: {len(broken)} guarantee(s) violated"
    else:
        headline = (
            f"Every promise kept: {served} served (store, level) pairs, 0 violations of "
            "what each level guarantees; the weaker levels show the anomalies they permit."
        )
    return Verdict(
        ok=not broken,
        headline=headline,
        lines={s: store_lines(m, s) for s in m.stores} | ({"broken": broken} if broken else {}),
    )


def plain(v: Verdict, stores: Sequence[str]) -> str:
    """The verdict as terminal text."""
    out = [v.headline]
    for s in [*stores, "broken"]:
        if s in v.lines:
            out.append(f"{s}:")
            out += [f"  - {line}" for line in v.lines[s]]
    return "\n".join(out)
