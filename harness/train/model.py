"""Softmax regression in numpy: the model the workers train.

Theory of operation
-------------------
Parameters are one flat float64 vector ``theta`` of ``(features + 1) * classes`` numbers
(weights then biases), so that a gradient, an update and a set of parameters all travel
through the store as the same bytes (:func:`encode`, little-endian float64, 5,200 bytes
for the digits). Everything is deterministic: no randomness here, the same inputs give
bit-identical outputs (numpy's float64 matmul on one machine), which is what lets BSP's
workers check that they hold identical parameters after every step (:func:`digest`).
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]
FEATURES = 64  # 8 x 8 pixels
CLASSES = 10


def size(features: int = FEATURES, classes: int = CLASSES) -> int:
    return (features + 1) * classes


def init(features: int = FEATURES, classes: int = CLASSES) -> Vector:
    """Zero parameters (convex problem: no symmetry to break)."""
    return np.zeros(size(features, classes), dtype=np.float64)


def _split(theta: Vector, features: int, classes: int) -> tuple[Vector, Vector]:
    w = theta[: features * classes].reshape(features, classes)
    b = theta[features * classes :]
    return w, b


def _probabilities(theta: Vector, x: Vector, classes: int) -> Vector:
    w, b = _split(theta, x.shape[1], classes)
    z = x @ w + b
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p: Vector = e / e.sum(axis=1, keepdims=True)
    return p


def gradient(theta: Vector, x: Vector, y: NDArray[np.int64], classes: int = CLASSES) -> Vector:
    """The gradient of the mean cross-entropy over the batch ``(x, y)`` at ``theta``."""
    p = _probabilities(theta, x, classes)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    gw = x.T @ p
    gb = p.sum(axis=0)
    out: Vector = np.concatenate([gw.ravel(), gb])
    return out


def evaluate(
    theta: Vector, x: Vector, y: NDArray[np.int64], classes: int = CLASSES
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``theta`` on ``(x, y)``."""
    p = _probabilities(theta, x, classes)
    loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    acc = float((p.argmax(axis=1) == y).mean())
    return loss, acc


def encode(v: Vector) -> bytes:
    return np.ascontiguousarray(v, dtype="<f8").tobytes()


def decode(data: bytes, n: int | None = None) -> Vector:
    """The vector ``encode`` wrote; ValueError when the length is not ``n`` floats."""
    if len(data) % 8:
        raise ValueError(f"{len(data)} bytes is not a whole number of float64s")
    v: Vector = np.frombuffer(data, dtype="<f8").astype(np.float64)
    if n is not None and len(v) != n:
        raise ValueError(f"expected {n} floats, got {len(v)}")
    return v


def digest(v: Vector) -> str:
    """16 hex digits of blake2b over the exact bytes: equal iff bit-identical."""
    return hashlib.blake2b(encode(v), digest_size=8).hexdigest()
