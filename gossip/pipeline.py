"""The gossip node's path from the core to the disk and the network, without asyncio.

Theory of operation
-------------------
Everything the core produces goes through one ``Pipeline``, which the asyncio node
(``gossip/node.py``) and the simulator (``gossip/sim.py``) drive alike, so the simulator
runs the production commit path on a simulated disk.

* After every call into the core the driver calls ``collect``: the core's outputs join
  the *open batch*: the latest value of each key to persist (remote state merged, records
  and tombstones collected as removals) and the messages to send. ``add_write`` adds a
  client write (its key, and its Applied record if any) the same way.
* ``take`` closes the open batch (a new one opens) and stamps it with the HLC high-water
  mark. ``commit`` makes it durable (``GossipStorage.commit``: the only disk I/O; the node
  runs it on its disk thread, one at a time, in the order taken). ``finish`` is called once
  it is durable: only then may its client writes be acknowledged and its messages be sent
  (a DeltasAck or an anti-entropy reply asserts that the data it covers is on disk), and
  it returns those messages.
* Durable before visible: the core applies a change to its replica at once, so
  ``unsynced`` maps each key whose latest change is in a batch not yet finished to that
  batch; a read of such a key must wait for it and serve ``durable_value`` (what the batch
  made durable), never the value in memory: a crash could still erase it.

A batch that fails to commit stays the driver's: a full disk (``DiskFullError``) is
retried with the same batch; any other error is fatal (the node stops: what is in
memory may then differ from the disk, so nothing more may be acknowledged or served).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gossip.core import GossipCore, Write
from gossip.crdt import Value
from gossip.messages import Message
from gossip.storage import CommitBatch, GossipStorage


@dataclass(slots=True)
class Batch:
    """What accumulated between two commits."""

    commit: CommitBatch = field(default_factory=CommitBatch)
    messages: list[Message] = field(default_factory=list)
    writes: int = 0  # client writes in it (acknowledged once it is finished)
    tag: Any = None  # the driver's (the node: a future resolved when it is finished)

    def __bool__(self) -> bool:
        return bool(self.commit or self.messages)


class Pipeline:
    """The open batch, the keys not yet durable, and the commit of one node."""

    def __init__(self, core: GossipCore, storage: GossipStorage) -> None:
        self.core = core
        self.storage = storage
        self.batch = Batch()  # the open batch
        # key -> the batch holding its latest change, until that batch is finished
        self.unsynced: dict[str, Batch] = {}
        self.pending_writes = 0  # client writes taken, not yet finished

    def collect(self) -> bool:
        """Move the core's outputs into the open batch; False if there were none."""
        out = self.core.take_outputs()
        if not (out.messages or out.to_persist or out.collected):
            return False
        b = self.batch
        kv = b.commit.kv
        kv.update(out.to_persist)
        unsynced = self.unsynced
        for k in out.to_persist:
            unsynced[k] = b
        for k, _ts in out.collected:
            kv[k] = None
            unsynced[k] = b
        b.messages.extend(out.messages)
        return True

    def add_write(self, w: Write) -> Batch:
        """A client write joins the open batch; returns the batch (acknowledge it once
        that batch is finished)."""
        b = self.batch
        core, kv, unsynced = self.core, b.commit.kv, self.unsynced
        for k in w.delta:
            kv[k] = core.get(k)
            unsynced[k] = b
        b.writes += 1
        self.pending_writes += 1
        return b

    def add_state(self, extra: dict[str, Value]) -> None:
        """Persist ``extra`` with the open batch (state loaded from an older format)."""
        self.batch.commit.kv.update(extra)

    def take(self) -> Batch:
        """Close the open batch (stamped with the HLC high-water mark) and open a new one."""
        b, self.batch = self.batch, Batch()
        if b.commit:
            b.commit.hlc = self.core.hlc_now
        return b

    def commit(self, b: Batch) -> None:
        """Make ``b`` durable (the only disk I/O). Raises what the storage raises."""
        if b.commit:
            self.storage.commit(b.commit)

    def finish(self, b: Batch) -> list[Message]:
        """``b`` is durable: its keys are visible, its writes may be acknowledged; returns
        its messages, to be sent now."""
        unsynced = self.unsynced
        for k in b.commit.kv:
            if unsynced.get(k) is b:
                del unsynced[k]
        self.pending_writes -= b.writes
        return b.messages

    @staticmethod
    def durable_value(b: Batch, key: str) -> Value | None:
        """What finished batch ``b`` made durable for ``key``."""
        return b.commit.kv.get(key)
