"""TCP proxies between nodes, one per *directed* link, to inject network faults.

Theory of operation
-------------------
A cluster of N nodes gets N*(N-1) proxies. The proxy for the link **A->B** listens on its
own port, and node A is started with that port as its peer address for B (see
``LocalCluster(peer_addresses=...)``); the proxy forwards to B's real port. So the link
A->B is exactly *the TCP connections that A opens to B*. Both byte directions of those
connections (A's requests and B's responses to them) belong to the link A->B. The
connections B opens to A (B's own requests to A) are the link B->A, a different proxy.

Cutting A->B while B->A passes is therefore an *asymmetric* partition at the RPC level:
A's RPCs to B fail, B's RPCs to A (and their responses) still work. Clients never go
through proxies; they talk to nodes directly.

Modes of one link (:class:`LinkMode`), switched at any time with :meth:`LinkProxy.set_mode`;
a switch takes effect *immediately*, also on connections already open (gRPC keeps long-lived
HTTP/2 connections, so only cutting new connections would cut nothing):

``pass``    bytes are forwarded as they come (``transport.write`` straight through, no
            per-byte work; flow control pauses the reading side when the writing side's
            buffer passes a high-water mark).
``delay``   every chunk is delivered ``delay_ms`` +- uniform ``jitter_ms`` later; order
            within a connection is preserved (a chunk is never delivered before an earlier
            one).
``drop``    like iptables DROP: connections stay open, bytes in both directions are silently
            discarded, new connections are accepted but lead nowhere. Senders see timeouts.
            A connection that lost bytes has a hole in its byte stream and can never carry
            a valid HTTP/2 stream again; such connections are reset (RST) when the link
            leaves ``drop``, and the peers reconnect over the healed link at once (a real
            network would instead retransmit; the effect on the RPC layer is the same:
            calls during the cut time out, calls after the heal work).
``reject``  like iptables REJECT with tcp-reset: open connections are aborted with RST
            (SO_LINGER 0), new connections are accepted and reset at once. Senders see
            connection errors quickly.

:class:`ProxyNet` owns all links of one cluster, allocates their ports and applies whole
partitions (a set of blocked directed links) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

HIGH_WATER = 8 * 1024 * 1024  # bytes buffered towards one side before reading pauses
LOW_WATER = 1024 * 1024


class LinkMode(enum.Enum):
    """What a link does with traffic (see the module docstring)."""

    PASS = "pass"
    DROP = "drop"
    REJECT = "reject"
    DELAY = "delay"


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """A link's mode; ``delay_ms``/``jitter_ms`` only matter in ``delay`` mode."""

    mode: LinkMode = LinkMode.PASS
    delay_ms: float = 0.0
    jitter_ms: float = 0.0


@dataclass(slots=True)
class LinkStats:
    """Traffic counters of one link (chunks, not bytes, are the unit of work)."""

    connections: int = 0  # accepted connections
    bytes_forwarded: int = 0
    bytes_dropped: int = 0
    resets: int = 0  # connections aborted with RST (reject, heal of a dropped connection)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Abort a TCP transport with RST (SO_LINGER 0) instead of a graceful FIN.

    A transport already closing gracefully (waiting to flush to a peer that stopped reading)
    is aborted too: left alone it would never close, and at interpreter exit its ``__del__``
    raised inside asyncio (an "Exception ignored" traceback printed by the test run)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class _Side(asyncio.Protocol):
    """One TCP connection of a proxied pair: ``down`` (from the source node, accepted) or
    ``up`` (to the destination node, dialled)."""

    def __init__(self, link: LinkProxy, conn: _Conn | None, is_down: bool) -> None:
        self.link = link
        self.conn = conn
        self.is_down = is_down
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.is_down:
            self.conn = _Conn(self.link, self)
            self.link._accepted(self.conn)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.forward(self.is_down, data)

    def eof_received(self) -> bool | None:
        return False  # close this side; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.lost(self.is_down)

    def pause_writing(self) -> None:
        if self.conn is not None:
            other = self.conn.other(self.is_down)
            if other is not None and not other.is_closing():
                other.pause_reading()

    def resume_writing(self) -> None:
        if self.conn is not None:
            other = self.conn.other(self.is_down)
            if other is not None and not other.is_closing():
                other.resume_reading()


class _Conn:
    """A proxied connection: source node <-> proxy <-> destination node."""

    def __init__(self, link: LinkProxy, down: _Side) -> None:
        self.link = link
        self.down = down
        self.up: _Side | None = None
        self.pending: list[bytes] = []  # source->dest bytes received before `up` connected
        self.holed = False  # bytes were discarded: the stream can never be valid again
        self.closed = False
        self.dialing: asyncio.Task[None] | None = None
        # delayed delivery per direction (True: towards dest): (due, data), FIFO, due sorted
        self.queues: dict[bool, deque[tuple[float, bytes]]] = {True: deque(), False: deque()}
        self.timers: dict[bool, asyncio.TimerHandle | None] = {True: None, False: None}

    def other(self, is_down: bool) -> asyncio.Transport | None:
        side = self.up if is_down else self.down
        return side.transport if side is not None else None

    def dial(self) -> None:
        if self.dialing is None and not self.closed:
            self.dialing = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.link.target
        try:
            _, proto = await loop.create_connection(
                lambda: _Side(self.link, self, is_down=False), host, port
            )
        except OSError:
            self.reset()  # destination down: the source sees a reset, as if refused
            return
        if self.closed:
            _reset(proto.transport)
            return
        self.up = proto
        pending, self.pending = self.pending, []
        for chunk in pending:
            self.forward(True, chunk)

    def forward(self, is_down: bool, data: bytes) -> None:
        policy = self.link.policy
        if policy.mode is LinkMode.REJECT:
            self.reset()
            return
        if policy.mode is LinkMode.DROP or self.holed:
            self.holed = True
            self.link.stats.bytes_dropped += len(data)
            return
        if is_down and self.up is None:
            self.pending.append(data)
            self.dial()
            return
        queue = self.queues[is_down]
        if policy.mode is LinkMode.PASS and not queue:
            target = self.other(is_down)
            if target is not None and not target.is_closing():
                target.write(data)
                self.link.stats.bytes_forwarded += len(data)
            return
        # delay mode (or pass mode with delayed chunks still queued: keep their order)
        now = time.monotonic()
        due = now
        if policy.mode is LinkMode.DELAY:
            jitter = self.link.rng.uniform(-policy.jitter_ms, policy.jitter_ms)
            due = now + max(0.0, policy.delay_ms + jitter) / 1000.0
        if queue:
            due = max(due, queue[-1][0])
        queue.append((due, data))
        self._arm(is_down)

    def _arm(self, is_down: bool) -> None:
        if self.timers[is_down] is None and self.queues[is_down]:
            loop = asyncio.get_running_loop()
            due = self.queues[is_down][0][0]
            # time.monotonic and loop.time share CLOCK_MONOTONIC on Linux; convert anyway
            when = loop.time() + (due - time.monotonic())
            self.timers[is_down] = loop.call_at(when, self._deliver, is_down)

    def _deliver(self, is_down: bool) -> None:
        self.timers[is_down] = None
        queue = self.queues[is_down]
        now = time.monotonic()
        target = self.other(is_down)
        while queue and queue[0][0] <= now + 0.0005:
            _, data = queue.popleft()
            mode = self.link.policy.mode
            if mode is LinkMode.DROP or self.holed:
                self.holed = True
                self.link.stats.bytes_dropped += len(data)
            elif mode is LinkMode.REJECT:
                self.reset()
                return
            elif target is not None and not target.is_closing():
                target.write(data)
                self.link.stats.bytes_forwarded += len(data)
        self._arm(is_down)

    def reset(self) -> None:
        """Abort both sides with RST."""
        if self.closed:
            return
        self.closed = True
        self.link.stats.resets += 1
        for timer in self.timers.values():
            if timer is not None:
                timer.cancel()
        _reset(self.down.transport)
        if self.up is not None:
            _reset(self.up.transport)
        if self.dialing is not None and not self.dialing.done():
            self.dialing.cancel()
        self.link._conns.discard(self)

    def lost(self, is_down: bool) -> None:
        """One side closed: close the other gracefully (flushing what it buffered)."""
        if not self.closed:
            self.closed = True
            for timer in self.timers.values():
                if timer is not None:
                    timer.cancel()
            other = self.other(is_down)
            if other is not None and not other.is_closing():
                other.close()
            if self.dialing is not None and not self.dialing.done():
                self.dialing.cancel()
        self.link._conns.discard(self)


def _tolerate_double_wakeup(server: asyncio.Server) -> None:
    """Work around CPython gh-109564 (fixed in 3.12.8 / 3.13.1): a connection accepted
    just before ``Server.close()`` detaches after the server already woke its waiters, and
    ``Server._wakeup`` then iterates ``None``: "Exception ignored ... TypeError" at exit."""
    wakeup = getattr(server, "_wakeup", None)
    if wakeup is None:
        return  # (uvloop's server, which has no such race)

    def tolerant() -> None:
        if server._waiters is not None:  # type: ignore[attr-defined]
            wakeup()

    server._wakeup = tolerant  # type: ignore[attr-defined]


class LinkProxy:
    """The proxy of one directed link ``src -> dst``: listens on ``listen`` and forwards to
    ``target`` (dst's real address)."""

    def __init__(
        self,
        src: str,
        dst: str,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.target = target
        self.host = host
        self.port = port
        self.rng = rng or random.Random(0)
        self.policy = LinkPolicy()
        self.stats = LinkStats()
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """``host:port`` the source node must dial to reach dst through this proxy."""
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Side(self, None, is_down=True),
            self.host,
            self.port,
            reuse_address=True,
            backlog=512,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        _tolerate_double_wakeup(self._server)

    def _accepted(self, conn: _Conn) -> None:
        self.stats.connections += 1
        self._conns.add(conn)
        if self.policy.mode is LinkMode.REJECT:
            conn.reset()
        elif self.policy.mode is LinkMode.DROP:
            conn.holed = True  # a black hole: never dialled, reset on heal
        else:
            conn.dial()

    def set_mode(self, mode: LinkMode | str, delay_ms: float = 0.0, jitter_ms: float = 0.0) -> None:
        """Switch the link's mode; applies to open connections at once."""
        mode = LinkMode(mode)
        self.policy = LinkPolicy(mode, delay_ms, jitter_ms)
        if mode is LinkMode.REJECT:
            for conn in list(self._conns):
                conn.reset()
        elif mode is not LinkMode.DROP:
            for conn in list(self._conns):
                if conn.holed:
                    conn.reset()

    def reset_all(self) -> None:
        """Reset every open connection (e.g. after the destination restarted)."""
        for conn in list(self._conns):
            conn.reset()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Accepted connections no longer tracked in _conns (one side lost, the other
            # still flushing) are aborted too (Python 3.13+).
            abort_clients = getattr(self._server, "abort_clients", None)
            if abort_clients is not None:
                abort_clients()
        for conn in list(self._conns):
            conn.reset()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


def _split(address: str | int) -> tuple[str, int]:
    if isinstance(address, int):
        return "127.0.0.1", address
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


class ProxyNet:
    """All links of one cluster: one :class:`LinkProxy` per ordered pair of nodes.

    ``targets`` maps node id -> its real address (``host:port`` or a port on 127.0.0.1).
    After :meth:`start`, :attr:`peer_addresses` is what ``LocalCluster(peer_addresses=...)``
    needs: ``(src, dst) -> address of the proxy src->dst``.
    """

    def __init__(
        self, targets: Mapping[str, str | int], *, host: str = "127.0.0.1", seed: int = 0
    ) -> None:
        self.nodes: list[str] = list(targets)
        rng = random.Random(seed)
        self.links: dict[tuple[str, str], LinkProxy] = {
            (a, b): LinkProxy(a, b, _split(targets[b]), host=host, rng=random.Random(rng.random()))
            for a in self.nodes
            for b in self.nodes
            if a != b
        }

    async def start(self) -> None:
        for link in self.links.values():
            await link.start()

    @property
    def peer_addresses(self) -> dict[tuple[str, str], str]:
        return {pair: link.address for pair, link in self.links.items()}

    def link(self, src: str, dst: str) -> LinkProxy:
        return self.links[(src, dst)]

    def set_link(
        self, src: str, dst: str, mode: LinkMode | str, delay_ms: float = 0, jitter_ms: float = 0
    ) -> None:
        self.links[(src, dst)].set_mode(mode, delay_ms, jitter_ms)

    def apply(
        self,
        blocked: Iterable[tuple[str, str]],
        mode: LinkMode | str = LinkMode.DROP,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
    ) -> None:
        """Put exactly the directed links in ``blocked`` into ``mode``; every other link passes."""
        cut = set(blocked)
        unknown = cut - set(self.links)
        if unknown:
            raise ValueError(f"unknown links: {sorted(unknown)}")
        for pair, link in self.links.items():
            if pair in cut:
                link.set_mode(mode, delay_ms, jitter_ms)
            elif link.policy.mode is not LinkMode.PASS:
                link.set_mode(LinkMode.PASS)

    def heal(self) -> None:
        """Every link passes again."""
        self.apply(())

    def blocked(self) -> list[tuple[str, str]]:
        """Links not in pass mode."""
        return sorted(p for p, link in self.links.items() if link.policy.mode is not LinkMode.PASS)

    def reset_links_to(self, nodes: Sequence[str]) -> None:
        """Reset open connections towards (and from) ``nodes``, e.g. after a restart."""
        for (a, b), link in self.links.items():
            if a in nodes or b in nodes:
                link.reset_all()

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            f"{a}->{b}": {
                "connections": link.stats.connections,
                "bytes_forwarded": link.stats.bytes_forwarded,
                "bytes_dropped": link.stats.bytes_dropped,
                "resets": link.stats.resets,
            }
            for (a, b), link in self.links.items()
        }

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()
