"""What the training workers keep in the store, and how they wait on it.

Theory of operation
-------------------
Every key of an experiment starts with its prefix (``train/<experiment>/``), so experiments
share a cluster without seeing each other.

BSP (raft, linearizable): step ``t``'s gradient of worker ``i`` is ``g/<t>/<i>``; the step's
*manifest* ``m/<t>`` lists the workers whose gradients the step averages, in the order they
joined it. A worker puts its gradient first, then joins the manifest by compare-and-swap
unless it already holds ``need = workers - backups`` names (with backup workers the slowest
``backups`` gradients of a step are dropped), then waits until the manifest is full and
averages the listed gradients in worker order: every worker reads the same manifest and
the same gradients, so every worker computes bit-identical parameters.

ASP (gossip) and SSP (raft): worker ``i``'s cumulative update is ``u/<i>``: a 16-byte
header (steps it has completed, unsigned; the monotonic time of its push, ns) and the
update vector, sum of ``-lr * gradient`` over its steps. Parameters are the initial ones
plus the sum of every worker's update: each key has one writer, so the state merges
without conflict on gossip (last-writer-wins never discards anything but a worker's own
older cumulative value) and the step counts say exactly which updates a reader saw.
"""

from __future__ import annotations

import json
import struct

from harness.train.model import Vector, decode, encode

_HEADER = struct.Struct("<QQ")  # steps completed, push time (monotonic ns)


def grad_key(prefix: str, step: int, worker: int) -> str:
    return f"{prefix}g/{step}/{worker}"


def manifest_key(prefix: str, step: int) -> str:
    return f"{prefix}m/{step}"


def update_key(prefix: str, worker: int) -> str:
    return f"{prefix}u/{worker}"


def encode_manifest(workers: list[int]) -> bytes:
    return json.dumps(workers, separators=(",", ":")).encode()


def decode_manifest(data: bytes | None) -> list[int]:
    """The workers listed (empty for a missing key); ValueError on anything else."""
    if not data:
        return []
    out = json.loads(data)
    if not isinstance(out, list) or not all(isinstance(w, int) for w in out):
        raise ValueError(f"not a manifest: {data[:60]!r}")
    return out


def encode_update(steps: int, pushed_ns: int, update: Vector) -> bytes:
    return _HEADER.pack(steps, max(0, pushed_ns)) + encode(update)


def decode_update(data: bytes, n: int) -> tuple[int, int, Vector]:
    """(steps, push time ns, update vector); ValueError when malformed."""
    if len(data) < _HEADER.size:
        raise ValueError(f"update of {len(data)} bytes has no header")
    steps, pushed = _HEADER.unpack_from(data)
    return steps, pushed, decode(data[_HEADER.size :], n)
