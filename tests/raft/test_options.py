"""`caplab node --set` options of the Raft store: parsed strictly, with errors that say why."""

import pytest

from caplab import errors
from raft.node import RaftOptions


def test_defaults_and_overrides() -> None:
    opts = RaftOptions.parse({"tick_ms": "20", "inline_sync_max": "0"})
    assert opts.tick_ms == 20
    assert opts.inline_sync_max == 0
    assert opts.election_timeout_s == pytest.approx(6 * 0.020)
    assert RaftOptions.parse({}) == RaftOptions()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tick": "5"}, "unknown raft option 'tick'; known: .*tick_ms"),
        ({"tick_ms": "fast"}, "tick_ms must be an integer"),
        ({"tick_ms": "0"}, "tick_ms must be >= 1"),
        ({"inline_sync_max": "-1"}, "inline_sync_max must be >= 0"),
    ],
)
def test_bad_options_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        RaftOptions.parse(options)
