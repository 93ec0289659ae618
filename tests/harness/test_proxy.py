"""The link proxies, against plain asyncio echo servers (no caplab node involved)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import time
from collections.abc import AsyncIterator

import pytest

from harness.proxy import LinkMode, LinkProxy, ProxyNet

SILENCE_S = 0.3  # how long "nothing arrives" is observed


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_ports() -> AsyncIterator[dict[str, int]]:
    servers = {}
    for name in ("a", "b", "c"):
        servers[name] = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield {n: s.sockets[0].getsockname()[1] for n, s in servers.items()}
    for s in servers.values():
        s.close()


@pytest.fixture
async def net(echo_ports: dict[str, int]) -> AsyncIterator[ProxyNet]:
    n = ProxyNet(echo_ports)
    await n.start()
    yield n
    await n.close()


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _roundtrip(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes, timeout: float = 5.0
) -> bytes:
    w.write(payload)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(payload)), timeout)


async def _silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes) -> bool:
    """True if nothing comes back within SILENCE_S and the connection stays open."""
    w.write(payload)
    await w.drain()
    try:
        data = await asyncio.wait_for(r.read(1), SILENCE_S)
    except TimeoutError:
        return True
    raise AssertionError(f"expected silence, got {data!r}")


async def _is_reset(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """True if the connection is reset (RST), not merely closed."""
    try:
        w.write(b"x")
        await w.drain()
        data = await asyncio.wait_for(r.read(1), 5.0)
    except ConnectionResetError:
        return True
    raise AssertionError(f"expected a reset, got {data!r}")


async def test_pass_forwards_both_ways_and_preserves_large_streams(net: ProxyNet) -> None:
    r, w = await _connect(net.link("a", "b").address)
    assert await _roundtrip(r, w, b"hello") == b"hello"
    payload = os.urandom(8 * 1024 * 1024)
    t = time.monotonic()
    assert await _roundtrip(r, w, payload, timeout=30) == payload
    assert time.monotonic() - t < 10  # not a bottleneck
    w.close()


async def test_partition_stops_only_the_chosen_direction_and_heal_restores(
    net: ProxyNet,
) -> None:
    ra, wa = await _connect(net.link("a", "b").address)  # a's connection to b
    rb, wb = await _connect(net.link("b", "a").address)  # b's connection to a
    assert await _roundtrip(ra, wa, b"1") == b"1"
    assert await _roundtrip(rb, wb, b"1") == b"1"

    net.apply([("a", "b")], LinkMode.DROP)  # asymmetric: a cannot reach b
    assert net.blocked() == [("a", "b")]
    assert await _silent(ra, wa, b"2")  # the open connection is cut at once
    assert await _roundtrip(rb, wb, b"2") == b"2"  # b still reaches a
    r2, w2 = await _connect(net.link("a", "b").address)  # new connections lead nowhere
    assert await _silent(r2, w2, b"new")
    rc, wc = await _connect(net.link("a", "c").address)  # other links untouched
    assert await _roundtrip(rc, wc, b"c") == b"c"

    net.heal()
    assert net.blocked() == []
    # connections that lost bytes have a hole in their stream: reset on heal
    assert await _is_reset(ra, wa)
    assert await _is_reset(r2, w2)
    r3, w3 = await _connect(net.link("a", "b").address)
    assert await _roundtrip(r3, w3, b"healed") == b"healed"
    assert await _roundtrip(rb, wb, b"3") == b"3"  # never cut, never reset
    assert net.link("a", "b").stats.bytes_dropped >= 4
    for w in (wb, w3, wc):
        w.close()


async def test_reject_resets_open_and_new_connections(net: ProxyNet) -> None:
    r, w = await _connect(net.link("a", "b").address)
    assert await _roundtrip(r, w, b"1") == b"1"
    net.set_link("a", "b", LinkMode.REJECT)
    assert await _is_reset(r, w)
    r2, w2 = await _connect(net.link("a", "b").address)
    assert await _is_reset(r2, w2)
    assert net.link("a", "b").stats.resets >= 2
    net.set_link("a", "b", LinkMode.PASS)
    r3, w3 = await _connect(net.link("a", "b").address)
    assert await _roundtrip(r3, w3, b"ok") == b"ok"
    w3.close()


async def test_drop_hangs_without_closing(net: ProxyNet) -> None:
    r, w = await _connect(net.link("b", "c").address)
    net.set_link("b", "c", LinkMode.DROP)
    assert await _silent(r, w, b"ping")
    assert not r.at_eof()
    assert net.link("b", "c").open_connections == 1
    w.close()


async def test_idle_connection_survives_a_drop_without_reset(net: ProxyNet) -> None:
    r, w = await _connect(net.link("a", "c").address)
    assert await _roundtrip(r, w, b"1") == b"1"
    net.set_link("a", "c", LinkMode.DROP)
    net.set_link("a", "c", LinkMode.PASS)  # nothing was lost: the stream is intact
    assert await _roundtrip(r, w, b"2") == b"2"
    w.close()


async def test_delay_adds_latency_and_keeps_order(net: ProxyNet) -> None:
    r, w = await _connect(net.link("a", "b").address)
    net.set_link("a", "b", LinkMode.DELAY, delay_ms=100, jitter_ms=40)
    t = time.monotonic()
    chunks = [bytes([i]) * 1000 for i in range(50)]
    for c in chunks:
        w.write(c)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(50_000), 10)
    # both directions are delayed: at least 2 * (100 - 40) ms for the round trip
    assert time.monotonic() - t >= 0.12
    assert got == b"".join(chunks)
    net.set_link("a", "b", LinkMode.PASS)
    assert await _roundtrip(r, w, b"fast") == b"fast"
    w.close()


async def test_destination_down_resets_the_source() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    link = LinkProxy("a", "b", ("127.0.0.1", port))
    await link.start()
    try:
        r, w = await _connect(link.address)
        assert await _is_reset(r, w)
    finally:
        await link.close()


async def test_peer_addresses_cover_every_directed_pair(net: ProxyNet) -> None:
    addrs = net.peer_addresses
    assert set(addrs) == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert len(set(addrs.values())) == 6


async def test_closing_a_proxy_while_a_connection_is_being_accepted_prints_nothing() -> None:
    """CPython gh-109564 (3.13.0, this machine's Python): a connection accepted just before
    the proxy's server closes made ``Server._wakeup`` iterate ``None`` when the transport
    was collected: an "Exception ignored" traceback in every few test runs."""
    caught: list[BaseException | None] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: caught.append(u.exc_value)
    try:
        for yields in range(6):  # the accept lands between the yields and the close
            target = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            link = LinkProxy("a", "b", ("127.0.0.1", target.sockets[0].getsockname()[1]))
            await link.start()
            sock = socket.create_connection(("127.0.0.1", link.port))
            for _ in range(yields):
                await asyncio.sleep(0)
            await link.close()
            sock.close()
            target.close()
            await target.wait_closed()
            gc.collect()
    finally:
        sys.unraisablehook = previous
    assert caught == []
