"""Conversion between the core's message dataclasses and the caplab.raft.v1 protobufs."""

from __future__ import annotations

from caplab.raft.v1 import raft_pb2 as pb
from raft.messages import (
    Append,
    AppendResp,
    Entry,
    EntryKind,
    Message,
    PreVote,
    PreVoteResp,
    ReadIndex,
    ReadIndexResp,
    TimeoutNow,
    Vote,
    VoteResp,
)


def entry_to_pb(e: Entry) -> pb.Entry:
    return pb.Entry(term=e.term, index=e.index, kind=int(e.kind), data=e.data)


def entry_from_pb(e: pb.Entry) -> Entry:
    return Entry(e.term, e.index, EntryKind(e.kind), e.data)


def to_pb(m: Message) -> pb.RaftMessage:
    """Every message but InstallSnapshot (which travels chunked on its own RPC)."""
    out = pb.RaftMessage(sender=m.frm, to=m.to, term=m.term)
    if isinstance(m, Append):
        out.append.CopyFrom(
            pb.Append(
                prev_index=m.prev_index,
                prev_term=m.prev_term,
                entries=[entry_to_pb(e) for e in m.entries],
                commit=m.commit,
                ctx=m.ctx,
            )
        )
    elif isinstance(m, AppendResp):
        out.append_response.CopyFrom(
            pb.AppendResponse(
                reject=m.reject,
                index=m.index,
                hint_index=m.hint_index,
                hint_term=m.hint_term,
                ctx=m.ctx,
            )
        )
    elif isinstance(m, PreVote):
        out.pre_vote.CopyFrom(pb.PreVote(last_index=m.last_index, last_term=m.last_term))
    elif isinstance(m, PreVoteResp):
        out.pre_vote_response.CopyFrom(pb.PreVoteResponse(reject=m.reject, blank=m.blank))
    elif isinstance(m, Vote):
        out.vote.CopyFrom(
            pb.Vote(last_index=m.last_index, last_term=m.last_term, transfer=m.transfer)
        )
    elif isinstance(m, VoteResp):
        out.vote_response.CopyFrom(pb.VoteResponse(reject=m.reject, blank=m.blank))
    elif isinstance(m, TimeoutNow):
        out.timeout_now.CopyFrom(pb.TimeoutNow())
    elif isinstance(m, ReadIndex):
        out.read_index.CopyFrom(pb.ReadIndex(ctx=m.ctx))
    elif isinstance(m, ReadIndexResp):
        out.read_index_response.CopyFrom(pb.ReadIndexResponse(ctx=m.ctx, index=m.index))
    else:
        raise TypeError(f"cannot encode {type(m).__name__} as a stream message")
    return out


def from_pb(m: pb.RaftMessage) -> Message:
    frm, to, term = m.sender, m.to, m.term
    body = m.WhichOneof("body")
    if body == "append":
        a = m.append
        return Append(
            frm,
            to,
            term,
            a.prev_index,
            a.prev_term,
            tuple(entry_from_pb(e) for e in a.entries),
            a.commit,
            a.ctx,
        )
    if body == "append_response":
        r = m.append_response
        return AppendResp(frm, to, term, r.reject, r.index, r.hint_index, r.hint_term, r.ctx)
    if body == "pre_vote":
        return PreVote(frm, to, term, m.pre_vote.last_index, m.pre_vote.last_term)
    if body == "pre_vote_response":
        r3 = m.pre_vote_response
        return PreVoteResp(frm, to, term, r3.reject, r3.blank)
    if body == "vote":
        return Vote(frm, to, term, m.vote.last_index, m.vote.last_term, m.vote.transfer)
    if body == "vote_response":
        r4 = m.vote_response
        return VoteResp(frm, to, term, r4.reject, r4.blank)
    if body == "timeout_now":
        return TimeoutNow(frm, to, term)
    if body == "read_index":
        return ReadIndex(frm, to, term, m.read_index.ctx)
    if body == "read_index_response":
        r2 = m.read_index_response
        return ReadIndexResp(frm, to, term, r2.ctx, r2.index)
    raise ValueError(f"raft message from {frm!r} has no known body ({body!r})")
