"""caplab train: the model, the data, the store protocol, the staleness measure and the
configuration (unit tests); the workers on real clusters (integration)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.train import data, model
from harness.train.protocol import decode_manifest, decode_update, encode_manifest, encode_update
from harness.train.run import TrainConfig, config_from_args, staleness

ROOT = Path(__file__).resolve().parents[2]


def test_the_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((16, 5))
    y = rng.integers(0, 3, 16)
    theta = rng.normal(size=model.size(5, 3))
    g = model.gradient(theta, x, y, classes=3)

    def loss(t: model.Vector) -> float:
        return model.evaluate(t, x, y, classes=3)[0]

    eps = 1e-6
    for k in range(0, len(theta), 3):
        e = np.zeros_like(theta)
        e[k] = eps
        numeric = (loss(theta + e) - loss(theta - e)) / (2 * eps)
        assert g[k] == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_encoding_and_digest_are_exact() -> None:
    v = np.random.default_rng(1).normal(size=model.size())
    assert np.array_equal(model.decode(model.encode(v), model.size()), v)
    assert model.digest(v) == model.digest(v.copy())
    w = v.copy()
    w[7] = np.nextafter(w[7], np.inf)  # one ulp
    assert model.digest(w) != model.digest(v)
    with pytest.raises(ValueError, match="expected 650 floats"):
        model.decode(model.encode(v[:10]), model.size())
    steps, pushed, u = decode_update(encode_update(7, 123, v), model.size())
    assert (steps, pushed) == (7, 123) and np.array_equal(u, v)
    assert decode_manifest(encode_manifest([2, 0])) == [2, 0] and decode_manifest(None) == []
    with pytest.raises(ValueError):
        decode_manifest(b'{"a": 1}')


def test_data_is_deterministic_and_sharded(tmp_path: Path) -> None:
    a = data.prepare(tmp_path / "a.npz", 3)
    b = data.load(tmp_path / "a.npz")
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert len(a.train_y) + len(a.test_y) == 1797 and a.train_x.max() <= 1.0
    shards = [data.shard(a, i, 4) for i in range(4)]
    assert sum(len(y) for _, y in shards) == len(a.train_y)
    x, y = shards[1]
    b1 = data.batch(x, y, 32, seed=3, worker=1, step=5)
    b2 = data.batch(x, y, 32, seed=3, worker=1, step=5)
    assert np.array_equal(b1[0], b2[0]) and not np.array_equal(
        b1[0], data.batch(x, y, 32, seed=3, worker=1, step=6)[0]
    )


def test_softmax_regression_learns_the_digits(tmp_path: Path) -> None:
    ds = data.prepare(tmp_path / "d.npz", 1)
    theta = model.init()
    for step in range(1, 201):
        bx, by = data.batch(ds.train_x, ds.train_y, 32, seed=1, worker=0, step=step)
        theta = theta - 0.5 * model.gradient(theta, bx, by)
    loss, acc = model.evaluate(theta, ds.test_x, ds.test_y)
    assert acc > 0.9 and loss < 0.5, (acc, loss)


def rec(pushed: float, seen: dict[str, int] | None = None) -> dict[str, object]:
    return {"pushed_at": pushed, "seen": seen if seen is not None else {}}


def test_staleness_of_one_worker_is_zero() -> None:
    out = staleness({0: [rec(0.1), rec(0.2), rec(0.3)]})
    assert [(r["staleness"], r["age_ms"]) for r in out[0]] == [(0, 0.0)] * 3


def test_staleness_counts_the_acknowledged_updates_a_gradient_lacked() -> None:
    records = {
        0: [rec(0.10, {"1": 0}), rec(0.50, {"1": 1}), rec(0.90, {"1": 3})],
        1: [rec(0.20, {"0": 0}), rec(0.30, {"0": 1}), rec(0.40, {"0": 1})],
    }
    out = staleness(records)
    # worker 0's second push (0.5 s) had seen 1 of worker 1's 3 acknowledged updates: 2
    # missing, the oldest acknowledged at 0.3 s
    assert [(r["staleness"], r["age_ms"]) for r in out[0]] == [(0, 0.0), (2, 200.0), (0, 0.0)]
    # worker 1's first push (0.2 s): worker 0's update of 0.1 s was missing
    assert [(r["staleness"], r["age_ms"]) for r in out[1]] == [(1, 100.0), (0, 0.0), (0, 0.0)]
    bsp = staleness({0: [{"digest": "ab"}]})
    assert bsp[0][0]["staleness"] is None and bsp[0][0]["age_ms"] is None


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "mode": "all",
        "workers": None,
        "nodes": None,
        "straggler": None,
        "partition": None,
        "duration": None,
        "staleness": None,
        "backups": 0,
        "seed": 1,
        "lr": 0.5,
        "step_ms": 20.0,
        "insecure": False,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_command_line_builds_a_config() -> None:
    cfg = config_from_args(args())
    assert cfg.modes == ("bsp", "asp", "ssp") and (cfg.workers, cfg.nodes) == (4, 4)
    assert [f"{m}-{c}" for m, c in cfg.experiments()][:3] == [
        "bsp-clean",
        "bsp-straggler",
        "bsp-partition",
    ]
    assert cfg.groups() == (["n1", "n2", "n3"], ["n4"])
    short = config_from_args(
        args(mode="asp", workers=2, nodes=3, duration=6.0, straggler="none", partition="1-4")
    )
    assert short.experiments() == [("asp", "clean"), ("asp", "partition")]
    assert short.partition == (1.0, 4.0) and short.straggler is None
    scaled = config_from_args(args(duration=20.0))
    assert scaled.partition == (5.0, 13.0)
    with pytest.raises(ValueError, match="each worker gets its own node"):
        TrainConfig(workers=5, nodes=4)
    with pytest.raises(ValueError, match="WORKER:FACTOR"):
        config_from_args(args(straggler="9:3"))
    with pytest.raises(ValueError, match="must lie within"):
        config_from_args(args(partition="5-40"))


# -- on real clusters ---------------------------------------------------------------------------


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "caplab.cli", "train", "--out", str(out), "--insecure", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )


def _records(out: Path, experiment: str, workers: int) -> dict[int, list[dict[str, Any]]]:
    return {
        i: [json.loads(line) for line in (out / experiment / f"worker{i}.jsonl").open()]
        for i in range(workers)
    }


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_caplab_train_short(tmp_path: Path) -> None:
    """The three modes end to end on 3-node clusters (the short form `make test` runs):
    BSP's workers hold identical parameters after every step, no SSP worker runs more
    than s steps ahead of the slowest, ASP's gradients are stale with several workers, and
    every mode learns."""
    out = tmp_path / "train"
    proc = _train(
        out,
        "--workers",
        "3",
        "--nodes",
        "3",
        "--duration",
        "4",
        "--straggler",
        "none",
        "--partition",
        "none",
        "--staleness",
        "2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bsp = _records(out, "bsp-clean", 3)
    digests: dict[int, set[str]] = {}
    for recs in bsp.values():
        for r in recs:
            digests.setdefault(r["step"], set()).add(r["digest"])
    assert len(digests) >= 10 and all(len(d) == 1 for d in digests.values()), digests
    ssp = _records(out, "ssp-clean", 3)
    leads = [r["lead"] for recs in ssp.values() for r in recs]
    assert leads and max(leads) <= 2 and min(leads) >= 0
    asp = _records(out, "asp-clean", 3)
    stale = [r["staleness"] for recs in asp.values() for r in recs]
    assert stale and max(stale) > 0 and min(stale) >= 0
    for name, per_worker in (("bsp", bsp), ("ssp", ssp), ("asp", asp)):
        accs = [r["acc"] for r in per_worker[0] if r.get("acc") is not None]
        assert accs and accs[-1] > 0.8, (name, accs)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["verdict"]["violations"] == []
    assert (out / "report.html").stat().st_size > 10_000


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_asp_with_one_worker_has_no_staleness(tmp_path: Path) -> None:
    out = tmp_path / "one"
    proc = _train(
        out,
        "--mode",
        "asp",
        "--workers",
        "1",
        "--nodes",
        "1",
        "--duration",
        "2",
        "--straggler",
        "none",
        "--partition",
        "none",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(out, "asp-clean", 1)[0]
    assert len(recs) >= 10 and {r["staleness"] for r in recs} == {0}
