"""Tests run on the event loop their code runs on in production: the nodes' code
(caplab.loop: uvloop) on uvloop, whose timers, for one, differ from asyncio's
(tests/foundation/test_deadlines.py); the harness's code (proxies, nemesis, runner, on
asyncio's loop) on asyncio's: tests/harness/ and modules marked ``harness_loop``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    if item.get_closest_marker("harness_loop") or item.nodeid.startswith("tests/harness/"):
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}
