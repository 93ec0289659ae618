"""Property tests of raft.quorum against naive reference implementations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from raft.quorum import Lost, Pending, Won, committed_index, majority, vote_result

_ids = st.lists(st.sampled_from([f"n{i}" for i in range(9)]), min_size=1, max_size=9, unique=True)


def _naive_committed(match: dict[str, int], voters: list[str]) -> int:
    best = 0
    for idx in {0, *match.values()}:
        if sum(1 for v in voters if match.get(v, 0) >= idx) * 2 > len(voters):
            best = max(best, idx)
    return best


@given(_ids, st.data())
def test_committed_index_matches_naive(voters: list[str], data: st.DataObject) -> None:
    keys = data.draw(st.lists(st.sampled_from([*voters, "x", "y"]), unique=True))
    match = {k: data.draw(st.integers(0, 20)) for k in keys}
    assert committed_index(match, voters) == _naive_committed(match, voters)


@given(_ids, st.data())
def test_vote_result_matches_naive(voters: list[str], data: st.DataObject) -> None:
    keys = data.draw(st.lists(st.sampled_from([*voters, "x"]), unique=True))
    votes = {k: data.draw(st.booleans()) for k in keys}
    yes = sum(1 for v in voters if votes.get(v) is True)
    no = sum(1 for v in voters if votes.get(v) is False)
    n = len(voters)
    expected = Won if 2 * yes > n else Lost if 2 * (n - no) <= n else Pending
    assert vote_result(votes, voters) is expected


def test_majority() -> None:
    assert [majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    assert committed_index({}, []) == 0
