"""The harness's history format: one JSON-lines file per store and run.

Theory of operation
-------------------
A history is the sequence of events a test run observed, in the order the single asyncio loop
of the harness recorded them (Jepsen-shaped). Each line of the file is one JSON object:

``index``      int, 0, 1, 2, ... in file order (line ``n`` of the file carries index ``n - 1``).
``time``       int, nanoseconds since the run started (monotonic clock); non-decreasing in
               file order.
``process``    int client id, or the string ``"nemesis"`` for fault-injection events.
``node``       str id of the node the client is pinned to, or null.
``type``       ``"invoke"`` | ``"ok"`` | ``"fail"`` | ``"info"``. ``fail`` means the operation
               definitely did not take effect; anything uncertain (timeout, connection lost
               after sending) is ``info``.
``f``          the function: ``read`` (at the store's default consistency), ``read-local``
               (a LOCAL read: this node's state, possibly stale; not part of the
               linearizability check, measured for staleness), ``write``, ``cas``,
               ``delete``, ``incr``, ``read-counter``, ... and nemesis functions
               (``partition``, ``heal``, ``kill``, ``restart``, ``pause``, ``resume``,
               ``clock-skew``).
``key``        str or null.
``value``      JSON. ``write``: the written string (invoke and completion). ``cas``:
               ``[expected, new]`` where ``expected`` null means "key absent"; an ``ok`` cas
               means the swap happened (a compare that did not match is a ``fail``).
               ``read``/``read-local``: null on the invoke, the value read on ``ok`` (null =
               absent).
               ``delete``: null. ``incr``: the integer delta. ``read-counter``: null on the
               invoke, the integer read on ``ok``. Nemesis events: free-form description.
``error``      str or null: why an operation failed or is indeterminate.

Optional fields (omitted from the file when null):

``latency_ns`` int, on completions: completion time minus the matching invoke's time.
``side``       str: which side of a partition the client's node was on when the operation
               was invoked (e.g. ``"majority"``/``"minority"``), when a partition is active.
``hlc``        ``[wall_ms, logical, node]``, on ``ok`` completions of mutations by a store
               that timestamps its writes (gossip): the hybrid logical clock timestamp the
               store gave the write (the response header's ``hlc``). Timestamps order the
               writes of one key as last-writer-wins does: by ``(wall_ms, logical, node)``.
``log_index``  int >= 1, on ``ok`` completions of mutations by a store that orders its
               writes in a replicated log (raft): the log index at which the write was
               applied (the response header's ``index``; the field ``index`` already names
               the event's position). A replica has applied the write iff its
               ``applied_index`` is at least this. Histories written before this field
               existed simply lack it.
``consistency`` str, on invokes of a client that picked a read guarantee (a spectrum
               workload): the level it asks for (``strong``, ``bounded_staleness``,
               ``session``, ``consistent_prefix``, ``monotonic_reads``, ``read_my_writes``,
               ``eventual``: :data:`harness.workload.LEVELS`), on its writes too, so that a
               session's operations can be grouped by level. Its ``strong`` reads are
               ``read``, every other level's are ``read-local``.
``roaming``    true, on invokes of a client that moves to another node between operations
               (its ``node`` changes; a pinned client's never does).
``client``     int >= 0, on invokes: the workload client that issued the operation. A
               client continues under a new ``process`` after an ``info`` (Jepsen's rule,
               for linearizability), but it is still one session (the same connection and
               session token): the session checkers group by ``client``.

Unknown extra fields are rejected so that a typo cannot silently drop data.

Within one process, events alternate strictly ``invoke``, completion, ``invoke``, ...; a
completion repeats the ``f`` and ``key`` of its invoke. An invoke may stay without completion
at the end of a history (the client crashed or the run stopped): it is then indeterminate.
:func:`pair_operations` turns events into :class:`Operation` intervals.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, TypeAlias, cast

Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None
EventType: TypeAlias = Literal["invoke", "ok", "fail", "info"]
CompletionType: TypeAlias = Literal["ok", "fail", "info"]
Process: TypeAlias = int | str

NEMESIS = "nemesis"
EVENT_TYPES: frozenset[str] = frozenset({"invoke", "ok", "fail", "info"})
CLIENT_FUNCTIONS: frozenset[str] = frozenset(
    {"read", "read-local", "write", "cas", "delete", "incr", "read-counter"}
)
NEMESIS_FUNCTIONS: frozenset[str] = frozenset(
    {"partition", "heal", "kill", "restart", "pause", "resume", "clock-skew"}
)
_REQUIRED = ("index", "time", "process", "node", "type", "f", "key", "value", "error")
_OPTIONAL = ("latency_ns", "side", "hlc", "log_index", "consistency", "roaming", "client")
Hlc: TypeAlias = tuple[int, int, str]  # (wall_ms, logical, node): ordered as LWW orders them


class HistoryError(ValueError):
    """A history file or event sequence is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a history file. See the module docstring for the meaning of each field."""

    index: int  # position in the history, 0-based, consecutive
    time: int  # ns since run start; non-decreasing with index
    process: Process  # int client id or "nemesis"
    node: str | None
    type: EventType
    f: str
    key: str | None
    value: Json
    error: str | None = None
    latency_ns: int | None = None  # completions only
    side: str | None = None
    hlc: Hlc | None = None  # ok completions of a gossip write/delete: its HLC timestamp
    log_index: int | None = None  # ok completions of a raft mutation: its log index
    consistency: str | None = None  # invokes of a spectrum client: its read guarantee
    roaming: bool = False  # invokes of a client that moves between nodes
    client: int | None = None  # invokes: the workload client (stable across processes)

    def to_json(self) -> dict[str, Json]:
        """The JSON object written for this event (optional fields omitted when null)."""
        out: dict[str, Json] = {
            "index": self.index,
            "time": self.time,
            "process": self.process,
            "node": self.node,
            "type": self.type,
            "f": self.f,
            "key": self.key,
            "value": self.value,
            "error": self.error,
        }
        if self.latency_ns is not None:
            out["latency_ns"] = self.latency_ns
        if self.side is not None:
            out["side"] = self.side
        if self.hlc is not None:
            out["hlc"] = list(self.hlc)
        if self.log_index is not None:
            out["log_index"] = self.log_index
        if self.consistency is not None:
            out["consistency"] = self.consistency
        if self.roaming:
            out["roaming"] = True
        if self.client is not None:
            out["client"] = self.client
        return out


@dataclass(frozen=True, slots=True)
class Operation:
    """An invoke paired with its completion: the interval [invoke_time, complete_time].

    ``complete_time`` is ``math.inf`` for every ``info`` operation (whether it completed with
    an ``info`` event or never completed): an indeterminate operation may take effect at any
    time after its invocation, or never.
    """

    process: Process
    node: str | None
    f: str
    key: str | None
    value: Json  # the invoke's value (the argument)
    result: Json  # the completion's value (e.g. the value read); None without completion
    type: CompletionType
    invoke_time: int
    complete_time: float  # int ns, or math.inf for info
    error: str | None = None
    index: int = -1  # index of the invoke event
    complete_index: int | None = None  # index of the completion event, None if none
    side: str | None = None
    hlc: Hlc | None = None  # the completion's HLC timestamp (gossip writes), if any
    log_index: int | None = None  # the completion's raft log index (raft mutations), if any
    consistency: str | None = None  # the invoke's read guarantee (spectrum clients)
    roaming: bool = False  # the invoke came from a client that moves between nodes
    client: int | None = None  # the workload client (one session across process ids)


def _bad(path: str | os.PathLike[str] | None, line: int | None, msg: str) -> HistoryError:
    where = str(path) if path is not None else "<history>"
    if line is not None:
        where = f"{where}:{line}"
    return HistoryError(f"{where}: {msg}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(f: str, etype: str, value: object) -> str | None:
    """Shape of ``value`` for client functions; returns a problem description or None."""
    if f == "write" and etype in ("invoke", "ok") and not isinstance(value, str):
        return f"write value must be a string, got {json.dumps(value)}"
    if f == "cas" and etype in ("invoke", "ok"):
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and (value[0] is None or isinstance(value[0], str))
            and isinstance(value[1], str)
        )
        if not ok:
            return f"cas value must be [expected-or-null, new], got {json.dumps(value)}"
    if (
        f in ("read", "read-local")
        and etype == "ok"
        and not (value is None or isinstance(value, str))
    ):
        return f"read result must be a string or null, got {json.dumps(value)}"
    if f == "incr" and etype in ("invoke", "ok") and not _is_int(value):
        return f"incr value must be an integer delta, got {json.dumps(value)}"
    if f == "read-counter" and etype == "ok" and not _is_int(value):
        return f"read-counter result must be an integer, got {json.dumps(value)}"
    return None


def event_from_json(
    obj: object, *, path: str | os.PathLike[str] | None = None, line: int | None = None
) -> Event:
    """Validate one decoded JSON line and build an :class:`Event` (raises HistoryError)."""
    if not isinstance(obj, dict):
        raise _bad(path, line, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise _bad(path, line, f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _bad(path, line, f"unknown field(s): {', '.join(unknown)}")
    index, t, process, node = obj["index"], obj["time"], obj["process"], obj["node"]
    etype, f, key, error = obj["type"], obj["f"], obj["key"], obj["error"]
    if not _is_int(index) or index < 0:
        raise _bad(path, line, f"index must be a non-negative integer, got {json.dumps(index)}")
    if not _is_int(t) or t < 0:
        raise _bad(path, line, f"time must be a non-negative integer (ns), got {json.dumps(t)}")
    if not (_is_int(process) or process == NEMESIS):
        raise _bad(
            path, line, f'process must be an integer or "nemesis", got {json.dumps(process)}'
        )
    if node is not None and not isinstance(node, str):
        raise _bad(path, line, f"node must be a string or null, got {json.dumps(node)}")
    if etype not in EVENT_TYPES:
        raise _bad(path, line, f"type must be one of invoke/ok/fail/info, got {json.dumps(etype)}")
    if not isinstance(f, str) or not f:
        raise _bad(path, line, f"f must be a non-empty string, got {json.dumps(f)}")
    if key is not None and not isinstance(key, str):
        raise _bad(path, line, f"key must be a string or null, got {json.dumps(key)}")
    if error is not None and not isinstance(error, str):
        raise _bad(path, line, f"error must be a string or null, got {json.dumps(error)}")
    latency = obj.get("latency_ns")
    if latency is not None and (not _is_int(latency) or latency < 0):
        raise _bad(path, line, f"latency_ns must be a non-negative integer, got {latency!r}")
    side = obj.get("side")
    if side is not None and not isinstance(side, str):
        raise _bad(path, line, f"side must be a string or null, got {json.dumps(side)}")
    raw_hlc = obj.get("hlc")
    hlc: Hlc | None = None
    if raw_hlc is not None:
        if not (
            isinstance(raw_hlc, list)
            and len(raw_hlc) == 3
            and _is_int(raw_hlc[0])
            and _is_int(raw_hlc[1])
            and raw_hlc[1] >= 0
            and isinstance(raw_hlc[2], str)
        ):
            raise _bad(
                path,
                line,
                f"hlc must be [wall_ms, logical, node], got {json.dumps(raw_hlc)}",
            )
        if etype == "invoke":
            raise _bad(path, line, "hlc belongs on a completion, not on an invoke")
        hlc = (raw_hlc[0], raw_hlc[1], raw_hlc[2])
    log_index = obj.get("log_index")
    if log_index is not None:
        if not _is_int(log_index) or log_index < 1:
            raise _bad(
                path, line, f"log_index must be a positive integer, got {json.dumps(log_index)}"
            )
        if etype == "invoke":
            raise _bad(path, line, "log_index belongs on a completion, not on an invoke")
    consistency = obj.get("consistency")
    if consistency is not None:
        if not isinstance(consistency, str) or not consistency:
            raise _bad(
                path, line, f"consistency must be a level name, got {json.dumps(consistency)}"
            )
        if etype != "invoke":
            raise _bad(path, line, "consistency belongs on an invoke, not on a completion")
    roaming = obj.get("roaming")
    if roaming is not None:
        if not isinstance(roaming, bool):
            raise _bad(path, line, f"roaming must be true or false, got {json.dumps(roaming)}")
        if roaming and etype != "invoke":
            raise _bad(path, line, "roaming belongs on an invoke, not on a completion")
    client = obj.get("client")
    if client is not None:
        if not _is_int(client) or client < 0:
            raise _bad(
                path, line, f"client must be a non-negative integer, got {json.dumps(client)}"
            )
        if etype != "invoke":
            raise _bad(path, line, "client belongs on an invoke, not on a completion")
    problem = _check_value(f, etype, obj["value"])
    if problem is not None:
        raise _bad(path, line, problem)
    return Event(
        index=index,
        time=t,
        process=process,
        node=node,
        type=cast(EventType, etype),
        f=f,
        key=key,
        value=cast(Json, obj["value"]),
        error=error,
        latency_ns=latency,
        side=side,
        hlc=hlc,
        log_index=log_index,
        consistency=consistency,
        roaming=bool(roaming),
        client=client,
    )


def read_history(path: str | os.PathLike[str]) -> list[Event]:
    """Read and validate a history file.

    Checks each line's fields and types, that indexes are 0, 1, 2, ... and that times never
    decrease. Blank lines are ignored. Raises :class:`HistoryError` naming the file and the
    1-based line number; the message is meant to be shown to a user without a traceback.
    """
    events: list[Event] = []
    last_time = 0
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as e:
        raise _bad(path, None, f"cannot open history: {e.strerror or e}") from e
    with fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise _bad(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from e
                ev = event_from_json(obj, path=path, line=lineno)
                if ev.index != len(events):
                    raise _bad(
                        path, lineno, f"index {ev.index} out of sequence (expected {len(events)})"
                    )
                if ev.time < last_time:
                    raise _bad(
                        path, lineno, f"time {ev.time} goes backwards (previous {last_time})"
                    )
                last_time = ev.time
                events.append(ev)
        except UnicodeDecodeError as e:
            raise _bad(path, None, f"not UTF-8 text: {e.reason}") from e
    return events


def write_history(path: str | os.PathLike[str], events: Iterable[Event]) -> None:
    """Write ``events`` to ``path`` as JSON lines (overwrites)."""
    with open(path, "w", encoding="utf-8") as fh:
        for ev in events:
            fh.write(json.dumps(ev.to_json(), separators=(",", ":")) + "\n")


class HistoryWriter:
    """Appends events to a JSON-lines history file.

    Used from the single asyncio loop of the harness (not thread-safe). Times are taken from
    ``clock`` (default ``time.monotonic_ns``) relative to the writer's creation, unless an
    explicit ``time`` is given. The writer enforces the per-process discipline (invoke, then
    one completion), fills ``latency_ns`` on completions, and flushes the file every
    ``flush_every`` events or when ``flush_interval_ns`` has passed since the last flush, and
    on :meth:`flush`/:meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        flush_every: int = 256,
        flush_interval_ns: int = 200_000_000,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._start = clock()
        self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        self._flush_every = max(1, flush_every)
        self._flush_interval_ns = flush_interval_ns
        self._unflushed = 0
        self._last_flush = self._start
        self._last_time = 0
        self._open: dict[Process, Event] = {}
        self.count = 0

    def now(self) -> int:
        """Nanoseconds since the run started, per this writer's clock."""
        return self._clock() - self._start

    def invoke(
        self,
        process: Process,
        f: str,
        key: str | None,
        value: Json = None,
        *,
        node: str | None = None,
        side: str | None = None,
        time: int | None = None,
        consistency: str | None = None,
        roaming: bool = False,
        client: int | None = None,
    ) -> Event:
        """Record the invocation of ``f`` by ``process``."""
        return self.append(
            "invoke",
            process,
            f,
            key,
            value,
            node=node,
            side=side,
            time=time,
            consistency=consistency,
            roaming=roaming,
            client=client,
        )

    def complete(
        self,
        type: CompletionType,
        process: Process,
        value: Json = None,
        *,
        error: str | None = None,
        time: int | None = None,
        hlc: Hlc | None = None,
        log_index: int | None = None,
    ) -> Event:
        """Record the completion of ``process``'s open operation (same f, key, node)."""
        inv = self._open.get(process)
        if inv is None:
            raise HistoryError(f"{self.path}: process {process!r} has no open invoke")
        return self.append(
            type,
            process,
            inv.f,
            inv.key,
            value,
            node=inv.node,
            error=error,
            time=time,
            hlc=hlc,
            log_index=log_index,
        )

    def append(
        self,
        type: EventType,
        process: Process,
        f: str,
        key: str | None,
        value: Json = None,
        *,
        node: str | None = None,
        error: str | None = None,
        side: str | None = None,
        time: int | None = None,
        hlc: Hlc | None = None,
        log_index: int | None = None,
        consistency: str | None = None,
        roaming: bool = False,
        client: int | None = None,
    ) -> Event:
        """Validate and append one event; returns it."""
        if self._fh is None:
            raise HistoryError(f"{self.path}: writer is closed")
        t = self.now() if time is None else time
        t = max(t, self._last_time)  # a history's times never go backwards
        latency: int | None = None
        if type == "invoke":
            if process in self._open:
                raise HistoryError(
                    f"{self.path}: process {process!r} invoked {f} while its "
                    f"{self._open[process].f} is still open"
                )
        else:
            inv = self._open.pop(process, None)
            if inv is None:
                raise HistoryError(f"{self.path}: {type} for process {process!r} without invoke")
            if inv.f != f or inv.key != key:
                self._open[process] = inv
                raise HistoryError(
                    f"{self.path}: completion {f}({key}) does not match the open "
                    f"{inv.f}({inv.key}) of process {process!r}"
                )
            latency = t - inv.time
        ev_obj: dict[str, Json] = {
            "index": self.count,
            "time": t,
            "process": process,
            "node": node,
            "type": type,
            "f": f,
            "key": key,
            "value": value,
            "error": error,
            "latency_ns": latency,
            "side": side,
            "hlc": None if hlc is None else list(hlc),
            "log_index": log_index,
            "consistency": consistency,
            "roaming": roaming or None,
            "client": client,
        }
        ev = event_from_json(ev_obj, path=self.path, line=self.count + 1)
        if type == "invoke":
            self._open[process] = ev
        self._fh.write(json.dumps(ev.to_json(), separators=(",", ":")) + "\n")
        self.count += 1
        self._last_time = t
        self._unflushed += 1
        now = self._clock()
        if (
            self._unflushed >= self._flush_every
            or now - self._last_flush >= self._flush_interval_ns
        ):
            self.flush()
        return ev

    def flush(self) -> None:
        """Push buffered events to the OS."""
        if self._fh is not None:
            self._fh.flush()
            self._unflushed = 0
            self._last_flush = self._clock()

    def close(self) -> None:
        """Flush and close the file; open invokes stay without completion (indeterminate)."""
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pair_operations(events: Sequence[Event]) -> list[Operation]:
    """Match each invoke with the next completion of the same process.

    Returns operations in invoke order. An invoke without completion becomes an ``info``
    operation; every ``info`` operation gets ``complete_time = math.inf``. Raises
    :class:`HistoryError` (naming the event index) on a completion without invoke, a second
    invoke while one is open, or a completion whose ``f``/``key`` differs from its invoke.
    """
    ops: list[Operation | None] = []
    open_: dict[Process, tuple[int, Event]] = {}
    for ev in events:
        if ev.type == "invoke":
            if ev.process in open_:
                prev = open_[ev.process][1]
                raise HistoryError(
                    f"event {ev.index}: process {ev.process!r} invoked {ev.f} while its "
                    f"{prev.f} (event {prev.index}) has not completed"
                )
            open_[ev.process] = (len(ops), ev)
            ops.append(None)
            continue
        slot = open_.pop(ev.process, None)
        if slot is None:
            raise HistoryError(
                f"event {ev.index}: {ev.type} {ev.f} for process {ev.process!r} without invoke"
            )
        pos, inv = slot
        if inv.f != ev.f or inv.key != ev.key:
            raise HistoryError(
                f"event {ev.index}: completion {ev.f}({ev.key}) does not match invoke "
                f"{inv.f}({inv.key}) (event {inv.index})"
            )
        ops[pos] = Operation(
            process=inv.process,
            node=inv.node,
            f=inv.f,
            key=inv.key,
            value=inv.value,
            result=ev.value,
            type=ev.type,  # narrowed: not "invoke" (handled above)
            invoke_time=inv.time,
            complete_time=math.inf if ev.type == "info" else ev.time,
            error=ev.error,
            index=inv.index,
            complete_index=ev.index,
            side=inv.side,
            hlc=ev.hlc,
            log_index=ev.log_index,
            consistency=inv.consistency,
            roaming=inv.roaming,
            client=inv.client,
        )
    for pos, inv in open_.values():
        ops[pos] = Operation(
            process=inv.process,
            node=inv.node,
            f=inv.f,
            key=inv.key,
            value=inv.value,
            result=None,
            type="info",
            invoke_time=inv.time,
            complete_time=math.inf,
            error="no completion recorded",
            index=inv.index,
            complete_index=None,
            side=inv.side,
            consistency=inv.consistency,
            roaming=inv.roaming,
            client=inv.client,
        )
    return [op for op in ops if op is not None]
