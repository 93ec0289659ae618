"""Pure quorum arithmetic for a single (non-joint) voter configuration.

Voters not present in a mapping count as "index 0" / "no answer yet"; keys of the mapping
that are not voters are ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import Enum


class VoteResult(Enum):
    """Outcome of an election (or pre-election) so far."""

    PENDING = "pending"  #: neither a majority of grants nor of rejects yet.
    LOST = "lost"  #: a majority can no longer grant.
    WON = "won"  #: a majority granted.


Won = VoteResult.WON
Lost = VoteResult.LOST
Pending = VoteResult.PENDING


def majority(n: int) -> int:
    """Smallest number of voters forming a majority of ``n`` voters (n >= 1)."""
    return n // 2 + 1


def committed_index(match: Mapping[str, int], voters: Collection[str]) -> int:
    """Largest index replicated (``match[v] >= index``) on a majority of ``voters``.

    Returns 0 for an empty voter set.
    """
    if not voters:
        return 0
    srt = sorted((match.get(v, 0) for v in voters), reverse=True)
    return srt[majority(len(srt)) - 1]


def vote_result(votes: Mapping[str, bool], voters: Collection[str]) -> VoteResult:
    """Tally ``votes`` (True = granted, False = rejected, absent = unknown)."""
    if not voters:
        return VoteResult.WON
    granted = rejected = 0
    for v in voters:
        r = votes.get(v)
        if r is True:
            granted += 1
        elif r is False:
            rejected += 1
    q = majority(len(voters))
    if granted >= q:
        return VoteResult.WON
    if granted + (len(voters) - granted - rejected) >= q:
        return VoteResult.PENDING
    return VoteResult.LOST
