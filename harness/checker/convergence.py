"""Convergence of replicas: how many distinct state digests over time, and when they agree.

Theory of operation
-------------------
The harness samples every node's state digest periodically: ``(time_ns, {node: digest})``;
a digest of ``None`` means the node could not be asked (down, paused, unreachable). For each
sample the *divergence* is the number of distinct known digests. After the heal time the
replicas have *converged* at the first sample from which on every later sample (including
itself) has all expected nodes answering with one and the same digest; a single agreeing
sample followed by disagreement does not count.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

Sample = tuple[int, Mapping[str, str | None]]


@dataclass(frozen=True, slots=True)
class ConvergenceResult:
    """Result of :func:`check_convergence` (times in ns since run start)."""

    divergence: tuple[tuple[int, int], ...]  # (time_ns, number of distinct digests)
    max_divergence: int
    heal_time_ns: int | None
    converged: bool
    converged_at_ns: int | None  # first sample (>= heal) from which all agree for good
    time_to_converge_ns: int | None  # converged_at_ns - heal_time_ns
    final_digests: Mapping[str, str | None]


def check_convergence(
    samples: Iterable[Sample],
    heal_time_ns: int | None = None,
    *,
    expected_nodes: Collection[str] | None = None,
) -> ConvergenceResult:
    """Divergence over time and the convergence point after ``heal_time_ns``.

    ``expected_nodes`` defaults to every node seen in any sample; a sample missing one of
    them, or with a ``None`` digest, cannot count as converged.
    """
    ordered = sorted(samples, key=lambda s: s[0])
    nodes = (
        set(expected_nodes)
        if expected_nodes is not None
        else {n for _, digests in ordered for n in digests}
    )
    divergence: list[tuple[int, int]] = []
    agree: list[bool] = []
    for t, digests in ordered:
        known = {d for d in digests.values() if d is not None}
        divergence.append((t, len(known)))
        complete = all(digests.get(n) is not None for n in nodes)
        agree.append(complete and len(known) == 1)
    heal = heal_time_ns if heal_time_ns is not None else (ordered[0][0] if ordered else 0)
    converged_at: int | None = None
    for i in range(len(ordered) - 1, -1, -1):
        if ordered[i][0] < heal or not agree[i]:
            break
        converged_at = ordered[i][0]
    return ConvergenceResult(
        divergence=tuple(divergence),
        max_divergence=max((d for _, d in divergence), default=0),
        heal_time_ns=heal_time_ns,
        converged=converged_at is not None,
        converged_at_ns=converged_at,
        time_to_converge_ns=(
            None if converged_at is None or heal_time_ns is None else converged_at - heal_time_ns
        ),
        final_digests=dict(ordered[-1][1]) if ordered else {},
    )
