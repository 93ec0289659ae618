"""Final state of an AP store's registers against the acknowledged writes' HLC timestamps."""

from __future__ import annotations

import math

from harness.checker.final_state import check_final_registers, fmt_hlc
from harness.history import Hlc, Json, Operation

MS = 1_000_000


def op(
    f: str,
    start: float,
    value: Json = None,
    *,
    hlc: Hlc | None = None,
    type: str = "ok",
    key: str = "k",
    process: int = 0,
    node: str = "n1",
) -> Operation:
    """A write/delete invoked at ``start`` ms, done 1 ms later (info: never)."""
    return Operation(
        process=process,
        node=node,
        f=f,
        key=key,
        value=value,
        result=value if type == "ok" and f == "write" else None,
        type=type,  # type: ignore[arg-type]
        invoke_time=int(start * MS),
        complete_time=math.inf if type == "info" else int((start + 1) * MS),
        hlc=hlc if type == "ok" else None,
    )


def put(start: float, v: str, wall: int, node: str = "n1", **kw: object) -> Operation:
    return op("write", start, v, hlc=(wall, 0, node), node=node, **kw)  # type: ignore[arg-type]


def delete(start: float, wall: int, node: str = "n1", **kw: object) -> Operation:
    return op("delete", start, hlc=(wall, 0, node), node=node, **kw)  # type: ignore[arg-type]


def everywhere(value: str | None, key: str = "k") -> dict[str, dict[str, Json]]:
    return {n: {key: value} for n in ("n1", "n2", "n3")}


def test_last_acknowledged_write_by_timestamp_wins() -> None:
    ops = [put(0, "a", 100), put(5, "b", 300), put(10, "c", 200, node="n2")]
    # LWW by HLC: "b" (wall 300) beats "c" (wall 200) though "c" came later in real time
    res = check_final_registers(ops, everywhere("b"))
    assert res.valid is True
    assert res.keys["k"].verdict == "ok"
    assert res.keys["k"].last is ops[1]
    assert res.acknowledged == 3 and res.deleted_keys == ()


def test_deleted_key_must_stay_absent() -> None:
    ops = [put(0, "a", 100), delete(5, 200), put(10, "b", 150, node="n2")]
    res = check_final_registers(ops, everywhere(None))
    assert res.valid is True
    assert res.deleted_keys == ("k",) and res.deletes_acknowledged == 1
    # the older put comes back on one replica: resurrection
    finals = everywhere(None)
    finals["n3"]["k"] = "b"
    res = check_final_registers(ops, finals)
    assert res.valid is False
    kf = res.keys["k"]
    assert kf.verdict == "resurrection"
    assert kf.reason.startswith("n3 holds 'b' (write 'b' at 150.0@n2 by process 0 on n2), but")
    assert "deleted by a later acknowledged write: delete at 200.0@n1" in kf.reason
    assert "RESURRECTION" in res.summary()


def test_older_write_or_delete_winning_is_a_lost_write() -> None:
    ops = [put(0, "a", 100), delete(5, 150), put(10, "b", 200)]
    res = check_final_registers(ops, everywhere("a"))
    assert res.valid is False and res.keys["k"].verdict == "lost"
    res = check_final_registers(ops, everywhere(None))
    assert res.valid is False and res.keys["k"].verdict == "lost"
    assert res.keys["k"].reason == (
        "n1, n2, n3 hold absent (delete at 150.0@n1 by process 0 on n1), older than the last "
        "acknowledged write: write 'b' at 200.0@n1 by process 0 on n1"
    )
    # nothing but a put was acknowledged, and the key is absent
    res = check_final_registers([put(0, "a", 100)], everywhere(None))
    assert res.keys["k"].verdict == "lost"
    assert "n1, n2, n3 hold absent, but the last acknowledged write was write 'a'" in (
        res.keys["k"].reason
    )


def test_values_nobody_wrote_and_disagreement() -> None:
    ops = [put(0, "a", 100)]
    res = check_final_registers(ops, everywhere("zzz"))
    assert res.valid is False and res.keys["k"].verdict == "unexplained"
    # an indeterminate write may have won on one replica only: disagreement
    ops = [put(0, "a", 100), op("write", 5, "b", type="info", process=1)]
    finals = everywhere("a")
    finals["n2"]["k"] = "b"
    res = check_final_registers(ops, finals)
    assert res.valid is False and res.keys["k"].verdict == "disagreement"


def test_indeterminate_writes_may_win() -> None:
    ops = [put(0, "a", 100), op("write", 5, "b", type="info", process=1)]
    res = check_final_registers(ops, everywhere("b"))
    assert res.valid is True and res.keys["k"].verdict == "indeterminate"
    ops = [put(0, "a", 100), op("delete", 5, type="info", process=1)]
    assert check_final_registers(ops, everywhere(None)).valid is True
    # failed writes did not happen: they explain nothing
    ops = [put(0, "a", 100), op("write", 5, "b", type="fail", process=1)]
    assert check_final_registers(ops, everywhere("b")).keys["k"].verdict == "unexplained"


def test_missing_reads_and_timestamps_are_unknown() -> None:
    ops = [put(0, "a", 100)]
    finals = everywhere("a")
    del finals["n2"]["k"]
    res = check_final_registers(ops, finals)
    assert res.valid == "unknown"
    assert res.keys["k"].reason == "no final read from n2"
    res = check_final_registers(ops, everywhere("a"), nodes=["n1", "n2", "n3", "n4"])
    assert res.valid == "unknown"
    untimed = [op("write", 0, "a")]
    res = check_final_registers(untimed, everywhere("a"))
    assert res.valid == "unknown"
    assert "carry no timestamp" in res.keys["k"].reason
    # without timestamps a value nobody wrote is still a violation
    assert check_final_registers(untimed, everywhere("b")).valid is False
    # a violation elsewhere still makes the whole verdict False
    res = check_final_registers([*ops, put(0, "x", 1, key="j")], {**finals, "n1": {"j": "y"}})
    assert res.valid is False


def test_keys_never_written_must_be_absent() -> None:
    assert check_final_registers([], everywhere(None)).valid is True
    assert check_final_registers([], everywhere("a")).keys["k"].verdict == "unexplained"


def test_fmt_hlc() -> None:
    assert fmt_hlc((1712, 3, "n2")) == "1712.3@n2"
    assert fmt_hlc(None) == "no timestamp"
