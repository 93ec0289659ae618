"""Layer 3 of the train report: the figures in words (a verdict read in five seconds).

Theory of operation
-------------------
Violations come first: BSP workers whose parameter digests differed after a step, an SSP
worker that ran further ahead of the slowest than the bound allows. Then a headline (which
mode reached the target first, and which promises held) and one sentence per finding,
always with its numbers: time to the target accuracy on the clean runs, what a straggler
cost each mode, what each mode did under the partition, and how many steps the BSP and
SSP checks covered. An experiment the run did not do is simply not mentioned; one that
failed is named with its error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.report.words import pct, plural
from harness.train.report.figures import (
    MODES,
    ExperimentFigures,
    StragglerEffect,
    TrainFigures,
)

MODE_NAMES = {"bsp": "BSP", "asp": "ASP", "ssp": "SSP"}
SLOWED = 1.1  # a slowdown at least this large is "slowed by"; below it, "kept its pace"
STOPPED_S = 1.0  # a stall at least this long (or a quarter of the window) is "stopped"
TIE_S = 0.05  # times to the target closer than this are a tie


@dataclass(frozen=True, kw_only=True)
class Verdict:
    ok: bool  # no violation
    headline: str
    lines: list[str]
    violations: list[str]

    @property
    def text(self) -> str:
        """The verdict as plain text for the console: headline, violations, then the lines."""
        return "\n".join([self.headline, *self.violations, *(f"  {x}" for x in self.lines)])


def mode_name(e: ExperimentFigures) -> str:
    name = MODE_NAMES.get(e.mode, e.mode.upper())
    if e.mode == "ssp" and e.staleness_bound is not None:
        return f"{name} (s={e.staleness_bound})"
    return name


def _steps(xs: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in xs[:10])
    return shown + (f" and {len(xs) - 10} more" if len(xs) > 10 else "")


def violations(f: TrainFigures) -> list[str]:
    out = []
    for e in f.experiments.values():
        if e.digests is not None and e.digests.disagreeing:
            bad = e.digests.disagreeing
            out.append(
                f"VIOLATION: {e.name}: BSP workers held different parameters after "
                f"{plural(len(bad), 'step')} (step {_steps(bad)}) of "
                f"{e.digests.checked} checked."
            )
        if e.lead is not None and not e.lead.ok:
            out.append(
                f"VIOLATION: {e.name}: an SSP worker ran {e.lead.max_lead} steps ahead of "
                f"the slowest, beyond the bound s={e.lead.bound}."
            )
    return out


def _stale(e: ExperimentFigures) -> str:
    st = e.staleness
    if st is None:
        return ""
    age = "" if e.age_ms is None else f", {e.age_ms.median:.0f} ms old"
    missed = ""
    if e.read_missed is not None:
        rm = e.read_missed
        missed = (
            "; its reads missed no acknowledged update"
            if rm.max == 0
            else f"; its reads missed up to {rm.max:g} acknowledged updates (p99 {rm.p99:g})"
        )
    return f" with median staleness {st.median:g} updates (p99 {st.p99:g}{age}{missed})"


def clean_line(f: TrainFigures) -> str | None:
    """Time to the target accuracy on the clean runs, per mode."""
    target = f"{pct(f.target)} held-out accuracy"
    clauses: list[str] = []
    for mode in MODES:
        e = f.get(mode, "clean")
        if e is None:
            continue
        first = not clauses
        if e.time_to_target_s is not None:
            reached = f"reached {target} in" if first else "in"
            clauses.append(
                f"{mode_name(e)} {reached} {e.time_to_target_s:.1f} s "
                f"({plural(e.steps_to_target or 0, 'step')}){_stale(e)}"
            )
        else:
            what = target if first else "it"
            clauses.append(
                f"{mode_name(e)} did not reach {what} in {e.duration_s:.1f} s "
                f"(final {pct(e.final_acc_mean)}){_stale(e)}"
            )
    return "; ".join(clauses) + "." if clauses else None


def _effect(e: ExperimentFigures, eff: StragglerEffect | None) -> str:
    """What the straggler cost the *other* workers (the total hides it: it counts the
    straggler's own lost steps), and, asynchronous modes, how stale its gradients were."""
    name = mode_name(e)
    if eff is None or eff.others_slowdown is None:
        text = f"{name} ran {e.total_steps_per_s:.1f} steps/s (no clean run to compare)"
    elif eff.others_slowdown >= SLOWED:
        text = f"{name} slowed the other workers by {eff.others_slowdown:.1f}x"
        if e.mode == "bsp":
            text += " (every step waits for it)"
        elif e.mode == "ssp":
            text += " (they wait once s steps ahead of it)"
    else:
        text = (
            f"{name}'s other workers kept their pace ({1 / eff.others_slowdown:.1f}x; "
            f"{eff.others_straggler_steps_per_s or 0:.1f} steps/s each, the straggler "
            f"{eff.straggler_own_steps_per_s or 0:.1f})"
        )
    s = e.straggler
    if e.mode in ("asp", "ssp") and s is not None and s.staleness_median is not None:
        text += f", the straggler's gradients {s.staleness_median:g} updates stale (median)"
    return text


def straggler_line(f: TrainFigures) -> str | None:
    exps = [e for m in MODES if (e := f.get(m, "straggler")) is not None]
    if not exps:
        return None
    s = next((e.straggler for e in exps if e.straggler is not None), None)
    who = "a straggler" if s is None else f"a {s.factor:g}x straggler (worker {s.worker})"
    clauses = [_effect(e, f.straggler_effect.get(e.mode)) for e in exps]
    return f"With {who}, " + "; ".join(clauses) + "."


def _under_partition(e: ExperimentFigures) -> str:
    p = e.partition
    assert p is not None
    name = mode_name(e)
    sides = f"majority {p.majority_steps} steps, minority {p.minority_steps}"
    if e.mode == "asp":
        if p.minority_steps > 0:
            text = f"{name} kept training on both sides ({sides})"
        else:
            text = f"{name} trained on the majority side only ({sides})"
        if p.divergence_max is not None:
            text += f", the sides drifted to distance {p.divergence_max:.3g}"
            if p.merged_after_s is not None:
                text += f" and merged {p.merged_after_s:.1f} s after the heal"
            elif p.divergence_before is not None:
                text += " and had not merged by the end"
        return text
    window = p.end_s - p.start_s
    if p.stall.length_s >= min(STOPPED_S, window / 4) and p.stall.length_s > 0:
        text = f"{name} stopped for {p.stall.length_s:.1f} s (no step completed)"
        if p.resumed_after_heal_s is not None:
            text += f" and resumed {p.resumed_after_heal_s:.1f} s after the heal"
        else:
            text += " and had not resumed by the end"
        return text
    return f"{name} kept going (longest pause {p.stall.length_s:.1f} s; {sides})"


def partition_line(f: TrainFigures) -> str | None:
    exps = [
        e for m in MODES if (e := f.get(m, "partition")) is not None and e.partition is not None
    ]
    if not exps:
        return None
    p = exps[0].partition
    assert p is not None
    return (
        f"Under the partition ({p.start_s:.1f}-{p.end_s:.1f} s), "
        + "; ".join(_under_partition(e) for e in exps)
        + "."
    )


def promise_lines(f: TrainFigures) -> list[str]:
    out = []
    bsp = [e for e in f.experiments.values() if e.digests is not None]
    if bsp and all(not e.digests.disagreeing for e in bsp if e.digests is not None):
        checked = sum(e.digests.checked for e in bsp if e.digests is not None)
        out.append(
            "BSP parameters were identical on every worker after every step "
            f"({plural(checked, 'step')} checked)."
        )
    ssp = [e for e in f.experiments.values() if e.lead is not None and e.lead.max_lead is not None]
    if ssp and all(e.lead.ok for e in ssp if e.lead is not None):
        top = max(e.lead.max_lead or 0 for e in ssp if e.lead is not None)
        bounds = sorted(
            {e.lead.bound for e in ssp if e.lead is not None and e.lead.bound is not None}
        )
        bound = ", ".join(f"s={b}" for b in bounds) or "no bound recorded"
        out.append(
            f"No SSP worker started a step more than {plural(top, 'step')} ahead of the "
            f"slowest (bound {bound})."
        )
    return out


def _headline(f: TrainFigures, bad: Sequence[str]) -> str:
    if bad:
        names = sorted({v.split(":")[1].strip() for v in bad})
        return f"VIOLATION: {plural(len(bad), 'broken promise')} ({', '.join(names)})"
    reached = [
        e for m in MODES if (e := f.get(m, "clean")) is not None and e.time_to_target_s is not None
    ]
    if reached:
        best = min(reached, key=lambda e: e.time_to_target_s or 0.0)
        t = best.time_to_target_s or 0.0
        # a tie (closer than TIE_S) names every mode in it
        tied = [e for e in reached if (e.time_to_target_s or 0.0) - t < TIE_S]
        who = " and ".join(MODE_NAMES.get(e.mode, e.mode) for e in tied)
        first = f"{who} reached {pct(f.target)} held-out accuracy first ({t:.1f} s)"
    elif any(e.condition == "clean" for e in f.experiments.values()):
        first = f"No mode reached {pct(f.target)} held-out accuracy on the clean run"
    else:
        first = f"{plural(len(f.experiments), 'experiment')} ran"
    held = []
    if any(e.digests is not None and e.digests.checked for e in f.experiments.values()):
        held.append("BSP kept every worker identical")
    ssp = [e for e in f.experiments.values() if e.lead is not None and e.lead.max_lead is not None]
    if ssp:
        bounds = sorted(
            {e.lead.bound for e in ssp if e.lead is not None and e.lead.bound is not None}
        )
        held.append("SSP stayed within " + (", ".join(f"s={b}" for b in bounds) or "its bound"))
    return first + ("; " + " and ".join(held) if held else "") + "."


def verdict(f: TrainFigures) -> Verdict:
    bad = violations(f)
    lines = [
        x for x in (clean_line(f), straggler_line(f), partition_line(f)) if x is not None
    ] + promise_lines(f)
    for e in f.experiments.values():
        if e.status != "complete":
            why = f": {e.error}" if e.error else ""
            lines.append(f"{e.name} did not finish ({e.status}{why}); its figures are partial.")
    return Verdict(ok=not bad, headline=_headline(f, bad), lines=lines, violations=bad)
