"""Benchmark of the linearizability checker on a simulated linearizable register history.

Run: ``.venv/bin/python -m harness.checker.bench_lin [--ops 10000 --keys 10 --procs 16]``.

:func:`simulate_register_history` is also used by the tests: it runs a real sequential
register (one per key) where each operation takes effect at a random instant inside its
[invoke, complete] interval, so the produced history is linearizable by construction.
Indeterminate (``info``) operations take effect with probability 1/2, possibly after the
client gave up on them, or never.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

from harness.checker.linearizable import check_register
from harness.history import CompletionType, Event, EventType, Json, pair_operations


@dataclass(slots=True)
class _SimOp:
    process: int
    key: str
    f: str
    arg: Json
    invoke: int
    complete: int
    effect: int | None  # linearization instant, None = never took effect
    info: bool
    drop_completion: bool
    result: Json = None
    type: CompletionType = "ok"


def simulate_register_history(
    rng: random.Random,
    n_ops: int = 10_000,
    n_keys: int = 10,
    n_procs: int = 16,
    info_rate: float = 0.02,
    read_rate: float = 0.5,
    cas_rate: float = 0.15,
    delete_rate: float = 0.05,
) -> list[Event]:
    """A linearizable register history of ``n_ops`` operations as history events."""
    keys = [f"k{i}" for i in range(n_keys)]
    clock = [rng.randrange(0, 1_000_000) for _ in range(n_procs)]
    pid = list(range(n_procs))  # a client that saw an indeterminate result gets a new id
    recent: dict[str, list[Json]] = {k: [None] for k in keys}
    ops: list[_SimOp] = []
    for j in range(n_ops):
        p = min(range(n_procs), key=lambda q: clock[q])
        key = rng.choice(keys)
        x = rng.random()
        arg: Json
        if x < read_rate:
            f, arg = "read", None
        elif x < read_rate + cas_rate:
            f, arg = "cas", [rng.choice(recent[key][-3:]), f"v{j}"]
        elif x < read_rate + cas_rate + delete_rate:
            f, arg = "delete", None
        else:
            f, arg = "write", f"v{j}"
        if f in ("write", "cas"):
            recent[key].append(f"v{j}")
        invoke = clock[p] + rng.randrange(1, 200_000)
        dur = rng.randrange(50_000, 3_000_000)
        complete = invoke + dur
        info = rng.random() < info_rate
        effect: int | None = invoke + rng.randrange(0, dur + 1)
        if info and rng.random() < 0.5:
            effect = None if rng.random() < 0.5 else invoke + rng.randrange(0, 5 * dur)
        drop = info and rng.random() < 0.2
        ops.append(_SimOp(pid[p], key, f, arg, invoke, complete, effect, info, drop))
        clock[p] = complete
        if info:
            pid[p] += n_procs
    state: dict[str, Json] = dict.fromkeys(keys)
    for op in sorted((o for o in ops if o.effect is not None), key=lambda o: o.effect or 0):
        cur = state[op.key]
        if op.f == "read":
            op.result = cur
        elif op.f == "write":
            state[op.key] = op.arg
            op.result = op.arg
        elif op.f == "delete":
            state[op.key] = None
        else:
            assert isinstance(op.arg, list)
            if cur == op.arg[0]:
                state[op.key] = op.arg[1]
                op.result = op.arg
            else:
                op.type = "fail"
                op.result = op.arg
    raw: list[tuple[int, int, _SimOp, EventType]] = []
    for seq, op in enumerate(ops):
        raw.append((op.invoke, 2 * seq, op, "invoke"))
        if op.info:
            if not op.drop_completion:
                raw.append((op.complete, 2 * seq + 1, op, "info"))
        else:
            raw.append((op.complete, 2 * seq + 1, op, op.type))
    raw.sort(key=lambda r: (r[0], r[1]))
    events: list[Event] = []
    for t, _, op, et in raw:
        if et == "invoke":
            value: Json = op.arg
        elif et == "info":
            value = None if op.f == "read" else op.arg
        else:
            value = op.result if op.f == "read" else op.arg
        events.append(
            Event(
                index=len(events),
                time=t,
                process=op.process,
                node=f"n{op.process % 3}",
                type=et,
                f=op.f,
                key=op.key,
                value=value,
                error="timeout" if et == "info" else None,
            )
        )
    return events


def main(argv: list[str] | None = None) -> int:
    """Generate a history, check it, print the timings; exit 1 unless it is linearizable."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--ops", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--info-rate", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    events = simulate_register_history(
        random.Random(args.seed), args.ops, args.keys, args.procs, args.info_rate
    )
    ops = pair_operations(events)
    t1 = time.perf_counter()
    n_info = sum(1 for o in ops if o.type == "info")
    print(
        f"history: {len(ops)} operations ({n_info} info), {args.keys} keys, "
        f"{args.procs} processes, seed {args.seed}; generated in {t1 - t0:.2f}s"
    )
    res = check_register(ops, timeout_s=args.timeout)
    t2 = time.perf_counter()
    print(f"check_register: valid={res.valid} in {t2 - t1:.2f}s")
    if res.valid is not True:
        print(res.summary())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
