"""The Raft peer path validates like the client path (defence in depth).

Peers will be authenticated, but even a member's buggy message must not corrupt the
others' storage or wedge a node. Two layers, tested separately:

* ``raft.codec.from_pb`` (and ``snapshot_from_pb``) refuse, with ``CodecError``, a
  protobuf message that correct Raft cannot send, or whose commands the client path
  would not have accepted (hand-built protobufs below);
* ``RaftCore.step`` refuses, without any effect and counted in ``stats``, what Raft
  forbids: gaps and scrambled terms in an Append, a second leader in a term, TimeoutNow
  from anybody but the leader, an acknowledgement beyond the leader's log, a snapshot
  whose content the application refuses (core messages below).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from caplab.raft.v1 import raft_pb2 as pb
from caplab.validation import INT64_MIN, MAX_VALUE_BYTES
from raft import codec
from raft.codec import MAX_INDEX, CodecError, check_command, from_pb, snapshot_from_pb, to_pb
from raft.core import RaftConfig, RaftCore, Role
from raft.messages import (
    Append,
    AppendResp,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    PreVote,
    Snapshot,
    SnapshotMeta,
    TimeoutNow,
    Vote,
)
from raft.statemachine import KvStateMachine, check_snapshot
from raft.storage import RaftStorage
from tests.raft.test_core import Net

CFG = RaftConfig(election_ticks=10, heartbeat_ticks=1)
IDS = ["n1", "n2", "n3"]
MIB = MAX_VALUE_BYTES


def put(key: str = "k", value: bytes = b"v", client_id: str = "c1", sequence: int = 1) -> bytes:
    return pb.Command(
        key=key, put=value, client_id=client_id, sequence=sequence
    ).SerializeToString()


# -- the codec -----------------------------------------------------------------------------
def pb_append(
    entries: list[tuple[int, int, int, bytes]],
    *,
    term: int = 3,
    prev_index: int = 10,
    prev_term: int = 2,
    commit: int = 10,
    sender: str = "n1",
    to: str = "n2",
) -> pb.RaftMessage:
    """An Append; ``entries``: (term, index, kind, data)."""
    return pb.RaftMessage(
        sender=sender,
        to=to,
        term=term,
        append=pb.Append(
            prev_index=prev_index,
            prev_term=prev_term,
            entries=[pb.Entry(term=t, index=i, kind=k, data=d) for t, i, k, d in entries],
            commit=commit,
        ),
    )


def test_codec_decodes_a_well_formed_append() -> None:
    m = from_pb(pb_append([(2, 11, 1, put()), (3, 12, 0, b""), (3, 13, 1, put("k2"))]))
    assert m == Append(
        "n1",
        "n2",
        3,
        10,
        2,
        (
            Entry(2, 11, EntryKind.COMMAND, put()),
            Entry(3, 12, EntryKind.NOOP, b""),
            Entry(3, 13, EntryKind.COMMAND, put("k2")),
        ),
        10,
        0,
    )
    assert isinstance(m, Append) and type(m.entries[0]) is Entry
    assert hash(m.entries[0]) == hash(Entry(2, 11, EntryKind.COMMAND, put()))


BAD_APPENDS = {
    "gap": pb_append([(3, 11, 1, put()), (3, 13, 1, put())]),
    "far beyond the log (review item 5)": pb_append([(3, 1000, 1, put())]),
    "starts at prev_index": pb_append([(3, 10, 1, put())]),
    "index repeated": pb_append([(3, 11, 1, put()), (3, 11, 1, put())]),
    "terms decrease": pb_append([(3, 11, 1, put()), (2, 12, 1, put())]),
    "term above the message's": pb_append([(4, 11, 1, put())]),
    "term below prev_term": pb_append([(1, 11, 1, put())]),
    "term 0": pb_append([(0, 1, 1, put())], prev_index=0, prev_term=0),
    "prev_term above the message's term": pb_append([], prev_term=4),
    "prev_index 0 with a prev_term": pb_append([], prev_index=0, prev_term=1),
    "prev_term 0 with a prev_index": pb_append([], prev_index=5, prev_term=0),
    "term beyond 2^62": pb_append([], term=MAX_INDEX),
    "prev_index beyond 2^62": pb_append([], prev_index=MAX_INDEX),
    "commit beyond 2^62": pb_append([], commit=MAX_INDEX),
    "entries beyond 2^62": pb_append([(3, MAX_INDEX, 1, put())], prev_index=MAX_INDEX - 1),
    "unknown entry kind": pb_append([(3, 11, 2, put())]),
    "no-op with data": pb_append([(3, 11, 0, b"x")]),
    "empty sender": pb_append([], sender=""),
    "empty recipient": pb_append([], to=""),
    "sender id too long": pb_append([], sender="n" * 129),
}


@pytest.mark.parametrize("case", BAD_APPENDS)
def test_codec_refuses_a_malformed_append(case: str) -> None:
    with pytest.raises(CodecError):
        from_pb(BAD_APPENDS[case])


BAD_COMMANDS = {
    "undecodable": b"\xff\xff\xff",
    "key not UTF-8": b"\x1a\x02\xff\xfe\x22\x01v",
    "no operation": pb.Command(key="k", client_id="c1", sequence=1).SerializeToString(),
    "empty key": put(key=""),
    "NUL in the key": put(key="a\x00b"),
    "key of 1025 bytes": put(key="k" * 1025),
    "key of 257 4-byte characters": put(key="\U0001f600" * 257),
    "value over 1 MiB": put(value=b"v" * (MIB + 1)),
    "cas new value over 1 MiB": pb.Command(
        key="k", cas=pb.CompareAndSwap(expected=b"a", new_value=b"v" * (MIB + 1))
    ).SerializeToString(),
    "cas expected value over 1 MiB": pb.Command(
        key="k", cas=pb.CompareAndSwap(expected=b"v" * (MIB + 1), new_value=b"a")
    ).SerializeToString(),
    "client id over 128 bytes": put(client_id="c" * 129),
    "client id over 128 bytes of UTF-8": put(client_id="\u00e9" * 65),
    "client id without sequence": put(client_id="c1", sequence=0),
    "sequence without client id": put(client_id="", sequence=3),
}


@pytest.mark.parametrize("case", BAD_COMMANDS)
def test_codec_refuses_an_append_carrying_an_invalid_command(case: str) -> None:
    data = BAD_COMMANDS[case]
    with pytest.raises(CodecError):
        from_pb(pb_append([(3, 11, 1, put()), (3, 12, 1, data)]))
    with pytest.raises(CodecError):
        check_command(data)


GOOD_COMMANDS = {
    "key of 1024 bytes": put(key="k" * 1024),
    "key of 256 4-byte characters": put(key="\U0001f600" * 256),
    "value of 1 MiB": put(value=b"v" * MIB),
    "empty value": put(value=b""),
    "client id of 128 bytes": put(client_id="c" * 128),
    "client id of 64 2-byte characters": put(client_id="\u00e9" * 64),
    "no request id": put(client_id="", sequence=0),
    "delete": pb.Command(key="k", delete=True).SerializeToString(),
    "cas": pb.Command(
        key="k", cas=pb.CompareAndSwap(expected=b"v" * MIB, new_value=b"w" * MIB)
    ).SerializeToString(),
    "cas on an absent key": pb.Command(
        key="k", cas=pb.CompareAndSwap(expected_absent=True, new_value=b"w")
    ).SerializeToString(),
    "increment by int64 min": pb.Command(key="k", increment=INT64_MIN).SerializeToString(),
}


@pytest.mark.parametrize("case", GOOD_COMMANDS)
def test_codec_accepts_commands_at_the_limits(case: str) -> None:
    data = GOOD_COMMANDS[case]
    m = from_pb(pb_append([(3, 11, 1, data)]))
    assert isinstance(m, Append) and m.entries[0].data == data
    check_command(data)


def test_codec_bounds_the_entries_of_one_append(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_ENTRIES_PER_APPEND", 2)
    from_pb(pb_append([(3, 11, 1, put()), (3, 12, 1, put())]))
    with pytest.raises(CodecError, match="entries"):
        from_pb(pb_append([(3, 11, 1, put()), (3, 12, 1, put()), (3, 13, 1, put())]))


BAD_OTHERS = {
    "no body": pb.RaftMessage(sender="n1", to="n2", term=3),
    "pre-vote: last term beyond 2^62": pb.RaftMessage(
        sender="n1", to="n2", term=3, pre_vote=pb.PreVote(last_index=5, last_term=MAX_INDEX)
    ),
    "vote: last index beyond 2^62": pb.RaftMessage(
        sender="n1", to="n2", term=3, vote=pb.Vote(last_index=MAX_INDEX, last_term=3)
    ),
    "vote: term beyond 2^62": pb.RaftMessage(
        sender="n1", to="n2", term=MAX_INDEX, vote=pb.Vote(last_index=5, last_term=3)
    ),
    "append response: index beyond 2^62": pb.RaftMessage(
        sender="n1", to="n2", term=3, append_response=pb.AppendResponse(index=MAX_INDEX)
    ),
    "append response: hint beyond 2^62": pb.RaftMessage(
        sender="n1",
        to="n2",
        term=3,
        append_response=pb.AppendResponse(reject=True, hint_index=MAX_INDEX),
    ),
    "read index response: index beyond 2^62": pb.RaftMessage(
        sender="n1",
        to="n2",
        term=3,
        read_index_response=pb.ReadIndexResponse(ctx=1, index=MAX_INDEX),
    ),
    "timeout now: empty sender": pb.RaftMessage(
        sender="", to="n2", term=3, timeout_now=pb.TimeoutNow()
    ),
}


@pytest.mark.parametrize("case", BAD_OTHERS)
def test_codec_refuses_other_malformed_messages(case: str) -> None:
    with pytest.raises(CodecError):
        from_pb(BAD_OTHERS[case])


def chunk(**kw: object) -> pb.SnapshotChunk:
    fields: dict[str, object] = {
        "sender": "n1",
        "to": "n2",
        "term": 3,
        "index": 10,
        "snapshot_term": 2,
    }
    fields.update(kw)
    return pb.SnapshotChunk(**fields)  # type: ignore[arg-type]


def test_codec_checks_the_header_of_a_snapshot() -> None:
    snap = Snapshot(SnapshotMeta(10, 2), b"data")
    assert snapshot_from_pb(chunk(), b"data") == InstallSnapshot("n1", "n2", 3, snap)
    for bad in (
        chunk(index=0),
        chunk(snapshot_term=0),
        chunk(snapshot_term=4),
        chunk(index=MAX_INDEX),
        chunk(term=MAX_INDEX, snapshot_term=2),
        chunk(sender=""),
        chunk(to="x" * 129),
    ):
        with pytest.raises(CodecError):
            snapshot_from_pb(bad, b"data")


def test_codec_decodes_everything_a_real_cluster_sends() -> None:
    """No false refusals: every stream message of a run (elections, replication with
    valid commands, heartbeats, a snapshot catch-up, reads, a transfer) decodes to itself."""
    net = Net(3)
    net.elect("n1")
    n1 = net.cores["n1"]
    net.isolate("n3")
    for i in range(30):
        n1.propose_batch([put(f"k{i}", b"v" * i, "c1", 2 * i + 1), put(f"j{i}", b"", "", 0)])
        net.flush()
    for nid in ("n1", "n2"):
        c = net.cores[nid]
        c.compact(c.applied_index, KvStateMachine().snapshot())
    net.heal()
    net.tick(5)
    assert n1.read_index(7)
    net.flush()
    assert n1.transfer_leadership("n3")
    net.flush()
    net.tick(3)
    assert net.leader() == "n3"
    kinds = set()
    for m in net.sent:
        if isinstance(m, InstallSnapshot):
            continue
        kinds.add(type(m).__name__)
        assert from_pb(pb.RaftMessage.FromString(to_pb(m).SerializeToString())) == m
    assert {"Append", "AppendResp", "Vote", "VoteResp", "PreVote", "TimeoutNow"} <= kinds


# -- the core --------------------------------------------------------------------------------
def log_of(*terms: int) -> list[Entry]:
    return [Entry(t, i, EntryKind.COMMAND, put(f"k{i}")) for i, t in enumerate(terms, 1)]


def drain(c: RaftCore) -> list[Message]:
    sent: list[Message] = []
    while (rd := c.ready()) is not None:
        sent.extend(rd.messages)
        c.advance(rd)
    return sent


def follower(
    terms: tuple[int, ...] = (1, 1, 2), term: int = 2, commit: int = 1, **kw: object
) -> RaftCore:
    """n2, following n1 (known from one heartbeat) in ``term``, its log of ``terms``."""
    c = RaftCore(
        "n2",
        IDS,
        CFG,
        random.Random(0),
        hard_state=HardState(term, None, commit),
        snapshot=None,
        entries=log_of(*terms),
        **kw,  # type: ignore[arg-type]
    )
    c.step(Append("n1", "n2", term, len(terms), terms[-1], (), commit, 0))
    drain(c)
    assert c.leader_id == "n1"
    return c


def view(c: RaftCore) -> tuple[object, ...]:
    return (
        c.term,
        c.vote,
        c.role,
        c.leader_id,
        c.commit_index,
        c.last_index,
        tuple(c.log_slice(0, c.last_index + 1)),
        c.snapshot,
    )


def assert_refused(c: RaftCore, m: Message, counter: str) -> None:
    """Stepping ``m`` into ``c`` changes nothing (state, log, Ready) but one counter."""
    before, counts = view(c), dict(vars_of(c))
    c.step(m)
    assert view(c) == before
    rd = c.ready()
    assert rd is None or (not rd.entries and rd.snapshot is None and not rd.messages), rd
    counts[counter] += 1
    assert vars_of(c) == counts
    assert c.last_refusal


def vars_of(c: RaftCore) -> dict[str, int]:
    s = c.stats
    return {k: getattr(s, k) for k in s.__dataclass_fields__}


def test_append_far_beyond_the_log_never_reaches_the_disk(tmp_path: Path) -> None:
    """Review item 5: an Append whose prev matched but whose entry claimed index 1000 was
    appended at index 4 of the in-memory log, handed to storage as entry 1000, and the
    node could not start again ("gap before entry 1000")."""
    log = log_of(1, 1, 1)
    storage = RaftStorage(tmp_path)
    storage.load()
    storage.save(HardState(1, None, 3), log)
    c = RaftCore(
        "n2", IDS, CFG, random.Random(0), hard_state=HardState(1, None, 3), snapshot=None,
        entries=log,
    )  # fmt: skip
    forged = Append("n1", "n2", 1, 3, 1, (Entry(1, 1000, EntryKind.COMMAND, put()),), 3, 0)
    c.step(forged)
    while (rd := c.ready()) is not None:
        storage.save(rd.hard_state, rd.entries, rd.snapshot)
        c.advance(rd)
    storage.close()
    again = RaftStorage(tmp_path)
    _, _, entries = again.load()  # (raised CorruptStorageError: gap before entry 1000)
    again.close()
    assert [e.index for e in entries] == [1, 2, 3]
    assert c.last_index == 3 and c.log_term(4) is None
    assert c.stats.refused_malformed == 1


BAD_CORE_APPENDS = {
    "gap": ((2, 3), (2, 5)),
    "far beyond the log": ((2, 1000),),
    "starts at prev_index": ((2, 3),),
    "index repeated": ((2, 4), (2, 4)),
    "going backwards (would truncate committed entries)": ((2, 4), (2, 1)),
    "terms decrease": ((3, 4), (2, 5)),
    "term above the message's": ((4, 4),),
    "term below prev_term": ((1, 4),),
}


@pytest.mark.parametrize("case", BAD_CORE_APPENDS)
def test_core_refuses_an_append_that_correct_raft_cannot_send(case: str) -> None:
    c = follower(term=3)
    ents = tuple(Entry(t, i, EntryKind.COMMAND, b"x") for t, i in BAD_CORE_APPENDS[case])
    assert_refused(c, Append("n1", "n2", 3, 3, 2, ents, 3, 0), "refused_malformed")


def test_core_refuses_a_malformed_append_before_adopting_its_term() -> None:
    c = follower(term=2)
    bad = Append("n3", "n2", 9, 3, 2, (Entry(9, 7, EntryKind.COMMAND, b"x"),), 3, 0)
    assert_refused(c, bad, "refused_malformed")
    assert c.term == 2


def test_append_beyond_the_last_index_is_rejected_and_writes_nothing() -> None:
    """(Standard Raft, already so before: kept as a guard.)"""
    c = follower(term=2)
    c.step(Append("n1", "n2", 2, 100, 2, (Entry(2, 101, EntryKind.COMMAND, put()),), 101, 0))
    rd = c.ready()
    assert rd is not None and rd.entries == () and rd.committed_entries == ()
    (resp,) = rd.messages
    assert isinstance(resp, AppendResp) and resp.reject and resp.hint_index == 3
    assert c.last_index == 3 and c.commit_index == 1


def test_core_refuses_an_append_from_a_second_leader_of_the_term() -> None:
    """Review item 1 at the current term: n3 is not the leader of term 2 (n1 is)."""
    c = follower(terms=(1, 1, 2), term=2, commit=1)
    evil = Append("n3", "n2", 2, 1, 1, (Entry(2, 2, EntryKind.COMMAND, put("k2", b"evil")),), 1, 0)
    assert_refused(c, evil, "refused_rival_leader")
    assert c.log_term(2) == 1 and c.log_term(3) == 2


def test_core_refuses_a_snapshot_from_a_second_leader_of_the_term() -> None:
    """Review item 4 at the current term: a snapshot only from the leader of its term."""
    c = follower(term=2)
    evil = InstallSnapshot(
        "n3", "n2", 2, Snapshot(SnapshotMeta(10, 2), KvStateMachine().snapshot())
    )
    assert_refused(c, evil, "refused_rival_leader")


def test_a_leader_refuses_an_append_of_its_own_term() -> None:
    net = Net(3)
    net.elect("n1")
    n1 = net.cores["n1"]
    net.flush()
    last = n1.last_index
    ent = Entry(n1.term, last + 1, EntryKind.COMMAND, b"x")
    rival = Append("n2", "n1", n1.term, last, n1.term, (ent,), 0, 0)
    assert_refused(n1, rival, "refused_rival_leader")
    assert n1.role is Role.LEADER


def test_the_leader_of_a_new_term_is_followed() -> None:
    c = follower(term=2)
    c.step(Append("n3", "n2", 3, 3, 2, (Entry(3, 4, EntryKind.NOOP, b""),), 3, 0))
    assert (c.term, c.leader_id, c.last_index) == (3, "n3", 4)
    assert c.stats == type(c.stats)()


def test_timeout_now_only_from_the_leader_of_the_current_term() -> None:
    c = follower(term=2)
    assert_refused(c, TimeoutNow("n3", "n2", 2), "refused_timeout_now")
    assert_refused(c, TimeoutNow("n1", "n2", 3), "refused_timeout_now")  # not its term
    c.step(TimeoutNow("n1", "n2", 2))
    assert c.role is Role.CANDIDATE and c.term == 3
    rd = c.ready()
    assert rd is not None
    assert all(isinstance(m, Vote) and m.transfer for m in rd.messages) and rd.messages


def test_a_vote_request_from_a_non_member_is_ignored() -> None:
    """(Already so before, now counted.)"""
    c = follower(term=2)
    assert_refused(c, Vote("n9", "n2", 50, 100, 49, True), "refused_non_member")
    assert_refused(c, PreVote("n2", "n2", 50, 100, 49), "refused_non_member")  # as itself


def test_a_message_for_another_node_is_ignored() -> None:
    c = follower(term=2)
    assert_refused(c, Vote("n1", "n3", 50, 100, 49, True), "refused_misaddressed")


def test_a_leader_refuses_an_acknowledgement_beyond_its_log() -> None:
    """A success that claims entries the leader never sent would make it count them as
    replicated there, and its next Append to that follower would start beyond its log."""
    net = Net(3)
    net.elect("n1")
    n1 = net.cores["n1"]
    net.flush()
    ack = AppendResp("n2", "n1", n1.term, False, 1000, 0, 0, 0)
    assert_refused(n1, ack, "refused_ack_beyond_log")
    assert n1.progress()["n2"] == n1.last_index
    assert n1.propose(put()) is not None
    net.flush()
    net.tick(1)
    assert net.cores["n2"].commit_index == n1.commit_index == n1.last_index


def test_core_refuses_a_snapshot_at_an_impossible_position() -> None:
    c = follower(term=2)
    data = KvStateMachine().snapshot()
    for meta in (SnapshotMeta(10, 3), SnapshotMeta(0, 1), SnapshotMeta(10, 0)):
        assert_refused(c, InstallSnapshot("n1", "n2", 2, Snapshot(meta, data)), "refused_malformed")


def state_snapshot(**kw: object) -> bytes:
    return pb.StateSnapshot(**kw).SerializeToString()  # type: ignore[arg-type]


BAD_SNAPSHOTS = {
    "undecodable": b"\xff\xff\xff",
    "empty key": state_snapshot(data={"": pb.KvValue(register=b"v", index=1)}),
    "NUL in a key": state_snapshot(data={"a\x00": pb.KvValue(register=b"v", index=1)}),
    "key of 1025 bytes": state_snapshot(data={"k" * 1025: pb.KvValue(register=b"v", index=1)}),
    "register over 1 MiB": state_snapshot(
        data={"k": pb.KvValue(register=b"v" * (MIB + 1), index=1)}
    ),
    "key without a value": state_snapshot(data={"k": pb.KvValue(index=1)}),
    "session without a client id": state_snapshot(sessions=[pb.Session(client_id="", low=1)]),
    "client id over 128 bytes": state_snapshot(sessions=[pb.Session(client_id="c" * 129)]),
}


def valid_state() -> bytes:
    sm = KvStateMachine()
    sm.apply(1, put("a", b"1", "c1", 1))
    sm.apply(2, pb.Command(key="n", increment=-5).SerializeToString())
    return sm.snapshot()


@pytest.mark.parametrize("case", BAD_SNAPSHOTS)
def test_core_refuses_a_snapshot_whose_content_is_invalid(case: str) -> None:
    """Review item 4: a snapshot replaced the whole state. Its content is now checked
    first (RaftCore's snapshot_check: the state machine's check_snapshot)."""
    c = follower(term=2, snapshot_check=check_snapshot)
    bad = Snapshot(SnapshotMeta(10, 2), BAD_SNAPSHOTS[case])
    assert_refused(c, InstallSnapshot("n1", "n2", 2, bad), "refused_snapshot_content")
    assert c.snapshot is None and c.last_index == 3
    good = Snapshot(SnapshotMeta(10, 2), valid_state())
    c.step(InstallSnapshot("n1", "n2", 2, good))
    rd = c.ready()
    assert rd is not None and rd.snapshot == good and c.commit_index == 10


@pytest.mark.parametrize("case", BAD_SNAPSHOTS)
def test_check_snapshot_refuses_invalid_content(case: str) -> None:
    with pytest.raises(ValueError):
        check_snapshot(BAD_SNAPSHOTS[case])


def test_check_snapshot_accepts_what_the_state_machine_writes() -> None:
    check_snapshot(valid_state())
    check_snapshot(KvStateMachine().snapshot())
    sm = KvStateMachine()
    sm.restore(valid_state())
    assert sm.get("a") == b"1" and sm.get("n") == -5
