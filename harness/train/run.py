"""``caplab train --out DIR``: the experiments, and the command line.

Theory of operation
-------------------
One experiment is one mode (``bsp`` over raft, ``asp`` over gossip, ``ssp`` over raft) in
one condition: ``clean``, ``straggler`` (worker ``k`` takes ``factor`` times longer per
step) or ``partition`` (the last ``(nodes - 1) // 2`` nodes cut off from the rest between
two instants, then healed). Each store's cluster is started once (through the harness's
fault proxies, as ``caplab run`` does) and its experiments run one after the other, each
under its own key prefix, for the same ``duration``:

1. every worker is a separate process (``python -m harness.train.worker``), a client of
   its own node (worker ``i`` on node ``i mod nodes``), started ahead and released at
   the same instant ``t0``;
2. the partition, if any, is cut and healed at its times after ``t0``;
3. on gossip, every ~250 ms each node's parameters (the sum of the cumulative updates it
   holds) are read LOCAL and their largest pairwise distance recorded (``divergence``);
4. the workers' logs are joined: each asynchronous gradient's *staleness* is the number
   of other workers' updates acknowledged before it was pushed that the parameters it was
   computed on did not include, its *age* how long before the push the oldest of them had
   been acknowledged, and ``stale_at_read`` the part of them acknowledged before its read
   began: what the read itself missed, 0 for a linearizable read (:func:`staleness`).

The run folder then holds ``run.json``, ``data.npz`` and one folder per experiment
(``experiment.json``, ``worker<i>.jsonl``, ``divergence.jsonl``, the workers' own logs);
:mod:`harness.train.report` turns it into ``report.html``, the plots and
``summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caplab import errors
from caplab.client import KVClient
from caplab.v1 import kv_pb2
from harness.files import write_text_atomic
from harness.train import data, model
from harness.train.protocol import decode_update, update_key

MODES = ("bsp", "asp", "ssp")
STORE_OF = {"bsp": "raft", "asp": "gossip", "ssp": "raft"}
CONDITIONS = ("clean", "straggler", "partition")
SCHEMA_VERSION = "caplab.train/1"
READY_TIMEOUT_S = 60.0  # for every worker process to load (imports, data, connection)
START_DELAY_S = 0.3  # from "all ready" to t0
SAMPLE_S = 0.25
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SHORT_WORKERS, SHORT_DURATION_S = 3, 4.0


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    modes: tuple[str, ...] = MODES
    workers: int = 4
    nodes: int = 4
    duration_s: float = 12.0
    # the emulated cost of one step of a real model: it, not the store, should dominate
    step_ms: float = 50.0
    lr: float = 0.5
    batch: int = 32
    seed: int = 1
    staleness: int = 3
    backups: int = 0
    straggler: tuple[int, float] | None = (3, 3.0)  # (worker, factor)
    partition: tuple[float, float] | None = (3.0, 8.0)  # seconds after t0
    target_accuracy: float = 0.9
    eval_every: int = 5
    secure: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be among {', '.join(MODES)}, got {', '.join(bad)}")
        if not 1 <= self.workers <= 15:
            raise ValueError(f"--workers must be 1..15, got {self.workers}")
        if not 1 <= self.nodes <= 15:
            raise ValueError(f"--nodes must be 1..15, got {self.nodes}")
        if self.workers > self.nodes:
            raise ValueError(
                f"--workers {self.workers} > --nodes {self.nodes}: each worker gets its own node"
            )
        if not 0 <= self.backups < self.workers:
            raise ValueError(f"--backups must be 0..{self.workers - 1}, got {self.backups}")
        if self.staleness < 0:
            raise ValueError(f"--staleness must be >= 0, got {self.staleness}")
        if self.duration_s <= 0 or self.step_ms < 0 or self.lr <= 0 or self.batch < 1:
            raise ValueError("--duration, --lr and --batch must be positive, --step-ms >= 0")
        if self.straggler is not None:
            w, f = self.straggler
            if not 0 <= w < self.workers or f < 1:
                raise ValueError(
                    f"--straggler WORKER:FACTOR needs 0 <= WORKER < {self.workers} and "
                    f"FACTOR >= 1, got {w}:{f:g}"
                )
        if self.partition is not None:
            a, b = self.partition
            if not 0 <= a < b <= self.duration_s:
                raise ValueError(
                    f"--partition START-END must lie within 0-{self.duration_s:g} s, "
                    f"got {a:g}-{b:g}"
                )
            if self.nodes < 3:
                raise ValueError("a partition needs --nodes >= 3 (a majority and a minority)")

    def experiments(self) -> list[tuple[str, str]]:
        """(mode, condition) in run order."""
        conds = ["clean"]
        if self.straggler is not None:
            conds.append("straggler")
        if self.partition is not None:
            conds.append("partition")
        return [(m, c) for m in self.modes for c in conds]

    def node_ids(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    def groups(self) -> tuple[list[str], list[str]]:
        ids = self.node_ids()
        cut = (self.nodes - 1) // 2
        return ids[: self.nodes - cut], ids[self.nodes - cut :]

    def to_json(self) -> dict[str, Any]:
        return {
            "modes": list(self.modes),
            "workers": self.workers,
            "nodes": self.nodes,
            "duration_s": self.duration_s,
            "step_ms": self.step_ms,
            "lr": self.lr,
            "batch": self.batch,
            "seed": self.seed,
            "staleness": self.staleness,
            "backups": self.backups,
            "straggler": None
            if self.straggler is None
            else {"worker": self.straggler[0], "factor": self.straggler[1]},
            "partition": None
            if self.partition is None
            else {"start_s": self.partition[0], "end_s": self.partition[1]},
            "target_accuracy": self.target_accuracy,
            "eval_every": self.eval_every,
        }


# -- staleness ------------------------------------------------------------------------------
def staleness(
    records: Mapping[int, Sequence[Mapping[str, Any]]],
) -> dict[int, list[dict[str, Any]]]:
    """Each worker's records with ``staleness`` and ``age_ms`` filled in (asp/ssp; records
    without ``seen`` get None): for a gradient pushed at ``P``, the other workers' updates
    acknowledged before ``P`` that its parameters did not include, and how long before
    ``P`` the oldest of them was acknowledged (0 when none)."""
    pushes = {
        w: [float(r["pushed_at"]) for r in recs if r.get("pushed_at") is not None]
        for w, recs in records.items()
    }
    out: dict[int, list[dict[str, Any]]] = {}
    for w, recs in records.items():
        done: list[dict[str, Any]] = []
        for r in recs:
            rec = dict(r)
            seen = r.get("seen")
            pushed = r.get("pushed_at")
            if seen is None or pushed is None:
                rec["staleness"], rec["age_ms"], rec["stale_at_read"] = None, None, None
                done.append(rec)
                continue
            missing = at_read = 0
            oldest = math.inf
            read_at = r.get("read_at")
            for j, times in pushes.items():
                if j == w:
                    continue
                acked = sum(1 for t in times if t < float(pushed))
                have = int(seen.get(str(j), 0))
                if acked > have:
                    missing += acked - have
                    oldest = min(oldest, times[have])  # j's first update it lacked
                if read_at is not None:
                    before = sum(1 for t in times if t < float(read_at))
                    at_read += max(0, before - have)
            rec["staleness"] = missing
            rec["age_ms"] = 0.0 if missing == 0 else round((float(pushed) - oldest) * 1000, 3)
            # Of those, the updates acknowledged before its read even began: what the read
            # itself missed. A linearizable read misses none (SSP over raft: always 0);
            # an eventual one misses what had not reached its node yet (ASP over gossip).
            rec["stale_at_read"] = None if read_at is None else at_read
            done.append(rec)
        out[w] = done
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line; a line a killed process left half
    written (or any other undecodable one) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


# -- one experiment ---------------------------------------------------------------------------
async def _divergence(
    endpoints: Mapping[str, str],
    prefix: str,
    workers: int,
    t0_ns: int,
    stop: asyncio.Event,
    out: list[dict[str, Any]],
) -> None:
    """Sample each node's parameters (LOCAL reads) and their largest pairwise distance."""
    n = model.size()
    clients = {node: KVClient([ep], timeout=0.5, retries=0) for node, ep in endpoints.items()}
    try:
        while not stop.is_set():

            async def params(c: KVClient) -> model.Vector | None:
                total = np.zeros(n)
                try:
                    got = await asyncio.gather(
                        *(
                            c.get(update_key(prefix, j), kv_pb2.CONSISTENCY_EVENTUAL)
                            for j in range(workers)
                        )
                    )
                except errors.StoreError:
                    return None
                for g in got:
                    if isinstance(g.value, bytes):
                        total += decode_update(g.value, n)[2]
                return total

            t = (time.monotonic_ns() - t0_ns) / 1e9
            views = await asyncio.gather(*(params(c) for c in clients.values()))
            have = [v for v in views if v is not None]
            distance: float | None = None
            if len(have) >= 2:
                distance = max(
                    float(np.linalg.norm(a - b)) for i, a in enumerate(have) for b in have[i + 1 :]
                )
            out.append(
                {
                    "t": round(t, 3),
                    "distance": None if distance is None else round(distance, 6),
                    "nodes": list(clients),
                    "answered": len(have),
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
    finally:
        for c in clients.values():
            await c.close()


async def _ready(i: int, p: asyncio.subprocess.Process, d: Path) -> None:
    """Until worker ``i`` says ``ready`` on stdout (RuntimeError if it exits first)."""
    assert p.stdout is not None
    while True:
        line = await p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {i} exited before starting; see {d}/worker{i}.log")
        if line.strip() == b"ready":
            return


async def run_experiment(
    cfg: TrainConfig,
    mode: str,
    condition: str,
    store_run: Any,  # harness.runner.StoreRun, set up
    out: Path,
) -> dict[str, Any]:
    """One experiment (module docstring); its ``experiment.json`` says whether it finished."""
    name = f"{mode}-{condition}"
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    endpoints: dict[str, str] = dict(store_run.cluster.endpoints)
    ids = cfg.node_ids()
    worker_nodes = {i: ids[i % cfg.nodes] for i in range(cfg.workers)}
    majority, minority = cfg.groups()
    straggler = cfg.straggler if condition == "straggler" else None
    partition = cfg.partition if condition == "partition" else None
    prefix = f"train/{name}/"
    procs: list[asyncio.subprocess.Process] = []
    logs = []
    samples: list[dict[str, Any]] = []
    error: str | None = None
    stop = asyncio.Event()
    sampler: asyncio.Task[None] | None = None
    try:
        for i in range(cfg.workers):
            wc = {
                "mode": mode,
                "worker": i,
                "workers": cfg.workers,
                "endpoint": endpoints[worker_nodes[i]],
                "prefix": prefix,
                "data": str(out / "data.npz"),
                "out": str(d / f"raw{i}.jsonl"),
                "t0_ns": 0,
                "wait_for_start": True,
                "duration_s": cfg.duration_s,
                "step_ms": cfg.step_ms,
                "factor": straggler[1] if straggler and straggler[0] == i else 1.0,
                "lr": cfg.lr,
                "batch": cfg.batch,
                "seed": cfg.seed,
                "staleness": cfg.staleness,
                "backups": cfg.backups,
                "eval_every": cfg.eval_every,
            }
            path = d / f"worker{i}.config.json"
            write_json(path, wc)
            log = (d / f"worker{i}.log").open("wb")
            logs.append(log)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "harness.train.worker",
                    str(path),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,  # "ready", then nothing
                    stderr=log,
                    start_new_session=True,
                )
            )
        # every worker loaded and connected: then one t0 for all
        try:
            await asyncio.wait_for(
                asyncio.gather(*(_ready(i, p, d) for i, p in enumerate(procs))), READY_TIMEOUT_S
            )
        except TimeoutError:
            raise TimeoutError(f"the workers were not ready within {READY_TIMEOUT_S:g} s") from None
        t0_ns = time.monotonic_ns() + int(START_DELAY_S * 1e9)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{t0_ns}\n".encode())
            await p.stdin.drain()
            p.stdin.close()
        if STORE_OF[mode] == "gossip":
            sampler = asyncio.create_task(
                _divergence(endpoints, prefix, cfg.workers, t0_ns, stop, samples)
            )

        async def at(t_s: float) -> None:
            delay = (t0_ns - time.monotonic_ns()) / 1e9 + t_s
            if delay > 0:
                await asyncio.sleep(delay)  # a scheduled instant of the experiment

        if partition is not None:
            await at(partition[0])
            await store_run.nemesis.partition("groups", groups=[majority, minority])
            await at(partition[1])
            await store_run.nemesis.heal()
        left = (t0_ns - time.monotonic_ns()) / 1e9 + cfg.duration_s + 30
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), max(left, 1.0))
        except TimeoutError:
            error = "a worker did not stop within 30 s of the end"
        for i, p in enumerate(procs):
            if p.returncode not in (0, None):
                error = error or f"worker {i} exited with {p.returncode}; see {d}/worker{i}.log"
    except Exception as e:  # this experiment failed: say why, and go on with the next
        error = f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        if sampler is not None:
            with contextlib.suppress(Exception):
                await sampler
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        for log in logs:
            log.close()
        if partition is not None and store_run.nemesis.current is not None:
            with contextlib.suppress(Exception):
                await store_run.nemesis.heal()  # the next experiment starts healed
    raw = {i: read_jsonl(d / f"raw{i}.jsonl") for i in range(cfg.workers)}
    for i, recs in staleness(raw).items():
        write_jsonl(d / f"worker{i}.jsonl", recs)
    if samples:
        write_jsonl(d / "divergence.jsonl", samples)
    doc = {
        "name": name,
        "mode": mode,
        "store": STORE_OF[mode],
        "condition": condition,
        "workers": cfg.workers,
        "nodes": cfg.nodes,
        "worker_nodes": {str(i): n for i, n in worker_nodes.items()},
        "staleness_bound": cfg.staleness if mode == "ssp" else None,
        "backups": cfg.backups if mode == "bsp" else 0,
        "straggler": None
        if straggler is None
        else {"worker": straggler[0], "factor": straggler[1]},
        "partition": None
        if partition is None
        else {
            "start_s": partition[0],
            "end_s": partition[1],
            "minority_nodes": minority,
            "minority_workers": [i for i, n in worker_nodes.items() if n in minority],
        },
        "duration_s": cfg.duration_s,
        "status": "failed" if error else "complete",
        "error": error,
    }
    write_json(d / "experiment.json", doc)
    return doc


# -- the run ----------------------------------------------------------------------------------
def start_run(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """The run folder's data set and its ``run.json`` marked unfinished (until the end)."""
    out.mkdir(parents=True, exist_ok=True)
    data.prepare(out / "data.npz", cfg.seed)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": "interrupted",
        "config": cfg.to_json(),
        "experiments": [f"{m}-{c}" for m, c in cfg.experiments()],
        "t0_unix_ns": time.time_ns(),
    }
    write_json(out / "run.json", doc)
    return doc


async def run_train_async(
    cfg: TrainConfig, out: Path, doc: dict[str, Any], say: Any = print
) -> dict[str, Any]:
    """Every experiment of ``cfg`` into ``out`` (prepared by :func:`start_run`)."""
    from harness.runner import StoreRun
    from harness.scenario import Scenario

    plan = cfg.experiments()
    stores = list(dict.fromkeys(STORE_OF[m] for m, _ in plan))
    failed: list[str] = []
    try:
        for store in stores:
            sc = Scenario(
                name="train", duration=cfg.duration_s, nodes=cfg.nodes, store=store, seed=cfg.seed
            )
            run = StoreRun(sc, store, out / "clusters", secure=cfg.secure)
            try:
                say(f"starting {cfg.nodes} {store} nodes ...")
                await run.setup()
                for mode, cond in plan:
                    if STORE_OF[mode] != store:
                        continue
                    say(f"{mode}-{cond} on {store}: {cfg.workers} workers, {cfg.duration_s:g} s")
                    exp = await run_experiment(cfg, mode, cond, run, out)
                    if exp["status"] != "complete":
                        failed.append(f"{exp['name']}: {exp['error']}")
            finally:
                await run.close()
    except BaseException as e:
        cut = isinstance(e, KeyboardInterrupt | asyncio.CancelledError)
        doc.update(status="interrupted" if cut else "failed", error=repr(e)[:500])
        write_json(out / "run.json", doc)
        raise
    # every experiment was run: the report shows the ones that failed as such
    doc.update(status="complete", failed=failed)
    write_json(out / "run.json", doc)
    return doc


def run_train(cfg: TrainConfig, out: Path, say: Any = print) -> dict[str, Any]:
    """Blocking entry point; SIGTERM and Ctrl-C stop every process (KeyboardInterrupt)."""

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_train_async(cfg, out, doc, say)

    doc = start_run(cfg, out)
    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


# -- the command line -----------------------------------------------------------------------
def _span(text: str) -> tuple[float, float]:
    a, sep, b = text.partition("-")
    if not sep:
        raise ValueError(f"expected START-END in seconds, e.g. 3-8, got {text!r}")
    return float(a.rstrip("s")), float(b.rstrip("s"))


def _straggler(text: str) -> tuple[int, float] | None:
    if text.lower() in ("none", "off", "0"):
        return None
    w, sep, f = text.partition(":")
    if not sep:
        raise ValueError(f"expected WORKER:FACTOR, e.g. 3:3, got {text!r}")
    return int(w), float(f.rstrip("x"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    modes = MODES if args.mode == "all" else (args.mode,)
    base = TrainConfig()
    if getattr(args, "short", False):  # the form `make demo` shows
        base = dataclasses.replace(
            base,
            workers=SHORT_WORKERS,
            nodes=SHORT_WORKERS,
            duration_s=SHORT_DURATION_S,
            straggler=(SHORT_WORKERS - 1, 3.0),
            partition=(1.0, 2.8),
        )
    workers = args.workers or base.workers
    nodes = args.nodes or max(workers, base.nodes if args.workers is None else workers)
    if args.nodes is None and args.partition not in ("none", "off"):
        nodes = max(nodes, 3)  # a partition needs a majority and a minority
    straggler = base.straggler if args.straggler is None else _straggler(args.straggler)
    if args.straggler is None and straggler is not None and straggler[0] >= workers:
        straggler = (workers - 1, straggler[1])
    partition = (
        base.partition
        if args.partition is None
        else (None if args.partition.lower() in ("none", "off") else _span(args.partition))
    )
    duration = args.duration or base.duration_s
    if args.partition is None and partition is not None and duration != base.duration_s:
        partition = (round(0.25 * duration, 1), round(0.65 * duration, 1))
    return dataclasses.replace(
        base,
        modes=modes,
        workers=workers,
        nodes=nodes,
        duration_s=duration,
        staleness=base.staleness if args.staleness is None else args.staleness,
        backups=args.backups,
        straggler=straggler,
        partition=partition,
        seed=args.seed,
        lr=args.lr,
        step_ms=args.step_ms,
        secure=not args.insecure,
    )


def add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="distributed SGD over the stores: BSP (raft), ASP (gossip), SSP (raft), with a "
        "straggler and a partition",
    )
    p.add_argument("--out", default="train-out", help="output folder (default: train-out)")
    p.add_argument(
        "--short",
        action="store_true",
        help=f"{SHORT_WORKERS} workers on {SHORT_WORKERS} nodes, {SHORT_DURATION_S:g} s per "
        "experiment (about a minute in all)",
    )
    p.add_argument(
        "--mode",
        choices=(*MODES, "all"),
        default="all",
        help="bsp (over raft), asp (over gossip), ssp (over raft) or all (default)",
    )
    p.add_argument(
        "--staleness",
        type=int,
        default=None,
        metavar="S",
        help="SSP: steps a worker may run ahead of the slowest (default 3)",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 4)")
    p.add_argument(
        "--nodes", type=int, default=None, help="nodes per store (default: 4, at least --workers)"
    )
    p.add_argument(
        "--straggler",
        default=None,
        metavar="WORKER:FACTOR",
        help="the straggler experiment's slow worker (default 3:3; none: skip it)",
    )
    p.add_argument(
        "--partition",
        default=None,
        metavar="START-END",
        help="the partition experiment's cut, s after the start (default 3-8; none)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="each experiment's length (default 12)",
    )
    p.add_argument(
        "--backups",
        type=int,
        default=0,
        help="BSP backup workers: each step averages the first N-b gradients",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.5, help="learning rate (default 0.5)")
    p.add_argument(
        "--step-ms",
        type=float,
        default=50.0,
        help="emulated model cost of one step, ms (default 50)",
    )
    p.add_argument("--insecure", action="store_true", help="no TLS between the nodes")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        console.print(f"caplab: error: {e}", style="red", highlight=False)
        return EXIT_USAGE
    out = Path(args.out)
    started = time.monotonic()
    console.print(
        f"[bold]caplab train[/]: {', '.join(cfg.modes)} x "
        f"{len(cfg.experiments()) // len(cfg.modes)} conditions, {cfg.workers} workers, "
        f"{cfg.duration_s:g} s each; output in {out.resolve()}",
        highlight=False,
    )
    try:
        doc = run_train(cfg, out, lambda s: console.print(f"  {s}", highlight=False))
    except KeyboardInterrupt:
        console.print("[red]interrupted; every process was stopped[/]")
        return EXIT_INTERRUPTED
    except (RuntimeError, TimeoutError, OSError) as e:
        console.print(f"[red]caplab train: the run failed: {e}[/]", highlight=False)
        return EXIT_FAILED
    from harness.train.report import ReportError, build_train_report

    try:
        report = build_train_report(out)
    except ReportError as e:
        console.print(f"[red]caplab train: {e}[/]", highlight=False)
        return EXIT_FAILED
    console.print(report.verdict.text, highlight=False, soft_wrap=True)
    console.print(
        f"report: {report.html_path.resolve()}  ({time.monotonic() - started:.0f} s in all)",
        highlight=False,
        soft_wrap=True,
    )
    if doc.get("failed") or not report.verdict.ok:
        return EXIT_FAILED
    return EXIT_OK


REGISTRARS = [add_train]
