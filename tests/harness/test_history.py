"""History format: writer/reader round trip, pairing and error messages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.history import (
    Event,
    HistoryError,
    HistoryWriter,
    pair_operations,
    read_history,
    write_history,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000

    def __call__(self) -> int:
        return self.t


def _write_sample(path: Path) -> list[Event]:
    clock = FakeClock()
    with HistoryWriter(path, clock=clock, flush_every=2) as hw:
        hw.invoke(0, "write", "k", "v1", node="n1")
        clock.t += 500
        hw.invoke(1, "read", "k", node="n2", side="minority")
        clock.t += 500
        hw.complete("ok", 0, "v1")
        hw.invoke(0, "cas", "k", ["v1", "v2"], node="n1")
        clock.t += 100
        hw.complete("ok", 1, "v1")
        hw.invoke("nemesis", "partition", None, {"minority": ["n2"]})
        hw.complete("info", "nemesis", "done")
        hw.complete("info", 0, ["v1", "v2"], error="timeout")
        hw.invoke(2, "incr", "c", 3, node="n3")
    return read_history(path)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    events = _write_sample(path)
    assert [e.index for e in events] == list(range(9))
    assert events[0].time == 0 and events[2].time == 1_000
    assert events[2].latency_ns == 1_000 and events[2].type == "ok"
    assert events[1].side == "minority"
    assert events[7].error == "timeout"
    first = json.loads(path.read_text().splitlines()[0])
    assert "latency_ns" not in first and first["node"] == "n1"
    copy = tmp_path / "copy.jsonl"
    write_history(copy, events)
    assert read_history(copy) == events


def test_delete_with_hlc_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, clock=FakeClock()) as hw:
        hw.invoke(0, "delete", "k", None, node="n1")
        hw.complete("ok", 0, None, hlc=(1_700_000_000_123, 4, "n1"))
        hw.invoke(0, "write", "k", "v", node="n1")
        hw.complete("info", 0, None, error="timeout")
    line = json.loads(path.read_text().splitlines()[1])
    assert line["hlc"] == [1_700_000_000_123, 4, "n1"]
    events = read_history(path)
    assert events[1].hlc == (1_700_000_000_123, 4, "n1")
    assert "hlc" not in json.loads(path.read_text().splitlines()[3])
    ops = pair_operations(events)
    assert (ops[0].f, ops[0].type, ops[0].hlc) == ("delete", "ok", (1_700_000_000_123, 4, "n1"))
    assert ops[1].hlc is None
    copy = tmp_path / "copy.jsonl"
    write_history(copy, events)
    assert read_history(copy) == events


def test_log_index_round_trip_and_old_histories(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, clock=FakeClock()) as hw:
        hw.invoke(0, "write", "k", "v", node="n1")
        hw.complete("ok", 0, "v", log_index=42)
        hw.invoke(0, "incr", "c", 2, node="n1")
        hw.complete("ok", 0, 2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1]["log_index"] == 42 and "log_index" not in lines[3]
    events = read_history(path)
    assert events[1].log_index == 42 and events[3].log_index is None
    ops = pair_operations(events)
    assert [o.log_index for o in ops] == [42, None]
    copy = tmp_path / "copy.jsonl"
    write_history(copy, events)
    assert read_history(copy) == events
    # a history written before the field existed reads as before
    old = tmp_path / "old.jsonl"
    old.write_text(_line() + "\n" + _line(index=1, type="ok", value="x") + "\n")
    assert [o.log_index for o in pair_operations(read_history(old))] == [None]


def test_consistency_and_roaming_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, clock=FakeClock()) as hw:
        hw.invoke(0, "read-local", "k", node="n1", consistency="session", roaming=True, client=7)
        hw.complete("ok", 0, "v")
        hw.invoke(1, "read", "k", node="n2")
        hw.complete("ok", 1, "v")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["consistency"] == "session" and lines[0]["roaming"] is True
    assert lines[0]["client"] == 7 and "client" not in lines[2]
    assert "consistency" not in lines[2] and "roaming" not in lines[2]
    assert "consistency" not in lines[1] and "roaming" not in lines[1]
    events = read_history(path)
    ops = pair_operations(events)
    assert [(o.consistency, o.roaming, o.client) for o in ops] == [
        ("session", True, 7),
        (None, False, None),
    ]
    copy = tmp_path / "copy.jsonl"
    write_history(copy, events)
    assert read_history(copy) == events


def test_writer_flushes_regularly(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    hw = HistoryWriter(path, flush_every=2)
    hw.invoke(0, "read", "k")
    hw.complete("ok", 0, None)
    assert len(path.read_text().splitlines()) == 2  # flushed before close
    hw.close()


def test_pair_operations(tmp_path: Path) -> None:
    ops = pair_operations(_write_sample(tmp_path / "h.jsonl"))
    by_f = {o.f: o for o in ops}
    assert [o.f for o in ops] == ["write", "read", "cas", "partition", "incr"]
    assert by_f["write"].type == "ok" and by_f["write"].complete_time == 1_000
    assert by_f["read"].result == "v1" and by_f["read"].node == "n2"
    assert by_f["cas"].type == "info" and by_f["cas"].complete_time == math.inf
    assert by_f["incr"].type == "info" and by_f["incr"].complete_time == math.inf
    assert by_f["incr"].complete_index is None
    assert by_f["partition"].process == "nemesis"


def test_writer_rejects_bad_discipline(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "h.jsonl") as hw:
        hw.invoke(0, "read", "k")
        with pytest.raises(HistoryError, match="still open"):
            hw.invoke(0, "read", "k")
        with pytest.raises(HistoryError, match="no open invoke"):
            hw.complete("ok", 5, None)
        with pytest.raises(HistoryError, match="cas value"):
            hw.invoke(1, "cas", "k", "oops")


def _line(**over: object) -> str:
    base: dict[str, object] = {
        "index": 0,
        "time": 0,
        "process": 0,
        "node": None,
        "type": "invoke",
        "f": "read",
        "key": "k",
        "value": None,
        "error": None,
    }
    base.update(over)
    return json.dumps(base)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], "h.jsonl:1: invalid JSON"),
        ([_line(), "[1, 2]"], "h.jsonl:2: expected a JSON object"),
        ([_line(index=1)], "h.jsonl:1: index 1 out of sequence (expected 0)"),
        ([_line(), _line(index=1, time=-1)], "h.jsonl:2: time must be a non-negative"),
        ([_line(time=5), _line(index=1, time=4)], "h.jsonl:2: time 4 goes backwards"),
        ([_line(type="done")], "h.jsonl:1: type must be one of"),
        ([_line(process="bob")], 'h.jsonl:1: process must be an integer or "nemesis"'),
        ([_line(f="write", value=3)], "h.jsonl:1: write value must be a string"),
        ([_line(f="cas", value=["a"])], "h.jsonl:1: cas value must be"),
        ([_line(f="incr", value="x")], "h.jsonl:1: incr value must be an integer"),
        ([_line(extra=1)], "h.jsonl:1: unknown field(s): extra"),
        ([_line(type="ok", hlc=[1, 2])], "h.jsonl:1: hlc must be [wall_ms, logical, node]"),
        ([_line(type="ok", hlc=[1, -2, "n1"])], "h.jsonl:1: hlc must be [wall_ms, logical"),
        ([_line(type="ok", hlc=["1", 2, "n1"])], "h.jsonl:1: hlc must be [wall_ms, logical"),
        ([_line(hlc=[1, 2, "n1"])], "h.jsonl:1: hlc belongs on a completion"),
        ([_line(type="ok", log_index=0)], "h.jsonl:1: log_index must be a positive integer"),
        ([_line(type="ok", log_index="7")], "h.jsonl:1: log_index must be a positive"),
        ([_line(log_index=7)], "h.jsonl:1: log_index belongs on a completion"),
        ([_line(consistency="")], "h.jsonl:1: consistency must be a level name"),
        ([_line(type="ok", consistency="session")], "h.jsonl:1: consistency belongs on an"),
        ([_line(roaming="yes")], "h.jsonl:1: roaming must be true or false"),
        ([_line(type="ok", roaming=True)], "h.jsonl:1: roaming belongs on an invoke"),
        ([_line(client=-1)], "h.jsonl:1: client must be a non-negative integer"),
        ([_line(client="c1")], "h.jsonl:1: client must be a non-negative integer"),
        ([_line(type="ok", client=3)], "h.jsonl:1: client belongs on an invoke"),
        (['{"index": 0}'], "h.jsonl:1: missing field(s): time, process"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(HistoryError) as info:
        read_history(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_file_and_blank_lines(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="cannot open history"):
        read_history(tmp_path / "nope.jsonl")
    path = tmp_path / "h.jsonl"
    path.write_text(_line() + "\n\n")
    assert len(read_history(path)) == 1


def test_pairing_errors() -> None:
    inv = Event(0, 0, 0, None, "invoke", "read", "k", None)
    with pytest.raises(HistoryError, match="event 0: ok read for process 0 without invoke"):
        pair_operations([Event(0, 0, 0, None, "ok", "read", "k", None)])
    with pytest.raises(HistoryError, match="has not completed"):
        pair_operations([inv, Event(1, 1, 0, None, "invoke", "read", "k", None)])
    with pytest.raises(HistoryError, match="does not match invoke"):
        pair_operations([inv, Event(1, 1, 0, None, "ok", "write", "k", "v")])
