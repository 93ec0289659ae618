"""The digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

Theory of operation
-------------------
:func:`prepare` loads them once (the orchestrator), scales pixels to [0, 1], splits them
into a training set and a held-out set with a seeded shuffle, and saves both to one
``.npz`` file that every worker loads (importing scikit-learn in each worker would cost
seconds). Worker ``i`` of ``n`` trains on the ``i``-th of ``n`` interleaved shards of the
training set and draws its minibatch of step ``t`` from a generator seeded by
``(seed, i, t)``: a run is deterministic under ``--seed``, and a step replayed after a
retry draws the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

HELD_OUT = 0.2


@dataclass(frozen=True, kw_only=True)
class Dataset:
    train_x: NDArray[np.float64]
    train_y: NDArray[np.int64]
    test_x: NDArray[np.float64]
    test_y: NDArray[np.int64]


def prepare(path: Path, seed: int) -> Dataset:
    """Load the digits, split them (seeded) and save them to ``path`` (.npz)."""
    from sklearn.datasets import load_digits  # (slow import: only the orchestrator)

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = round(len(y) * (1 - HELD_OUT))
    train, test = order[:cut], order[cut:]
    ds = Dataset(train_x=x[train], train_y=y[train], test_x=x[test], test_y=y[test])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y)
    tmp.replace(path)
    return ds


def load(path: Path) -> Dataset:
    with np.load(path) as f:
        return Dataset(
            train_x=f["train_x"], train_y=f["train_y"], test_x=f["test_x"], test_y=f["test_y"]
        )


def shard(ds: Dataset, worker: int, workers: int) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Worker ``worker``'s interleaved share of the training set."""
    return ds.train_x[worker::workers], ds.train_y[worker::workers]


def batch(
    x: NDArray[np.float64], y: NDArray[np.int64], size: int, *, seed: int, worker: int, step: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """The minibatch of ``step`` (deterministic in ``seed``, ``worker``, ``step``)."""
    rng = np.random.default_rng([seed, worker, step])
    idx = rng.choice(len(y), size=min(size, len(y)), replace=False)
    return x[idx], y[idx]
