"""caplab.loop: nodes and the no-op server run on uvloop unless told otherwise."""

from __future__ import annotations

import asyncio

import pytest

from caplab import loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(loop.ENV, raising=False)
    assert loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loop.ENV, "asyncio")
    assert loop.run(_loop_module()).startswith("asyncio")


def test_unknown_loop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loop.ENV, "tokio")
    with pytest.raises(SystemExit, match="must be 'uvloop' or 'asyncio'"):
        loop.loop_factory()
