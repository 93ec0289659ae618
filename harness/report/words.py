"""Numbers in plain words: percentages, seconds, plurals (shared by the verdict and tables)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def pct(x: float | None) -> str:
    """A fraction as a percentage; "100%" and "0%" only when exact."""
    if x is None:
        return "n/a"
    if x >= 1.0:
        return "100%"
    if x <= 0.0:
        return "0%"
    v = x * 100
    text = f"{v:.0f}%"
    if text in ("100%", "0%"):
        text = f"{v:.1f}%"
        if text in ("100.0%", "0.0%"):
            text = f"{v:.2f}%"
    return text


def plural(n: int, word: str) -> str:
    """``1 key``, ``2 keys``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def secs(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1f} s" if abs(x) >= 0.95 else f"{x:.2f} s"


def ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"


def short(v: object, width: int = 18) -> str:
    """A value for a sentence: repr-like, cut to ``width`` characters."""
    text = "absent" if v is None else repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= width else text[: width - 1] + "…"


def discard_example(d: Mapping[str, Any]) -> str:
    """One acknowledged write last-writer-wins discarded (a ``LwwDiscard.to_json()``), in
    words: key, both values, both timestamps, which side."""

    def who(prefix: str) -> str:
        side = d.get(f"{prefix}_side")
        at = d.get(f"{prefix}_at_s")
        parts = [str(d.get(f"{prefix}_node") or "?")]
        if side:
            parts.append(str(side))
        if isinstance(at, int | float):
            parts.append(f"acked at {at:.2f} s")
        return ", ".join(parts)

    return (
        f"key {d.get('key')}: {short(d.get('lost_value'))} ({who('lost')}) "
        f"lost to {short(d.get('winner_value'))} ({who('winner')})"
    )
