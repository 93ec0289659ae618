"""Local clusters of real `caplab node` processes on 127.0.0.1.

Each node gets a free port, its own data directory and a log file. Nodes can be
stopped (SIGTERM), killed (SIGKILL), paused (SIGSTOP), resumed (SIGCONT) and
restarted with the same identity and data. A node that exits by itself (not through
`kill`/`stop`) is reported once by `LocalCluster.unexpected_exits()`; the others keep
running. No process outlives the cluster: every node runs in its own process group and
`close()` kills what is left; an atexit hook covers interpreter exits, and nodes started
with CAPLAB_EXIT_WITH_PARENT=1 (as here) exit by themselves when their parent process
dies.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caplab.security import channel_credentials, ensure_dev_certs

_LIVE: set[subprocess.Popen[bytes]] = set()
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _kill_all_at_exit() -> None:
    for p in list(_LIVE):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


atexit.register(_kill_all_at_exit)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_rng = random.Random()


_HANDED_OUT: dict[int, float] = {}  # port -> when free_ports last returned it (monotonic)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago.

    They are picked *below* the kernel's ephemeral range, so that the source ports of
    outgoing connections and listeners bound to port 0 (the harness's proxies) cannot take
    them between now and the moment a node binds them.
    """
    lo, _ = _ephemeral_range()
    candidates = range(10_000, lo) if lo > 11_000 else range(0)
    socks: list[socket.socket] = []
    now = time.monotonic()
    for port in [p for p, t in _HANDED_OUT.items() if now - t > 120]:
        del _HANDED_OUT[port]
    try:
        for _ in range(200 * n):
            if len(socks) == n or not candidates:
                break
            port = _rng.choice(candidates)
            if port in _HANDED_OUT:
                # handed out a moment ago in this process, maybe not bound yet (the demo
                # starts both stores' clusters at once): never twice
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            _HANDED_OUT[port] = now
        while len(socks) < n:  # fall back to whatever the kernel hands out
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NodeProcess:
    node_id: str
    port: int
    data_dir: Path
    log_path: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    # True once kill()/stop() ended the process on purpose (an exit then is no news);
    # exit_reported: its unexpected exit was already returned by unexpected_exits()
    expected_exit: bool = False
    exit_reported: bool = False
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code of the last process (negative: killed by that signal), None while
        it runs or before the first start."""
        return None if self.proc is None else self.proc.poll()

    def start(self) -> None:
        if self.running:
            return
        self._reap()  # a previous process that died by itself
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        # A child inherits the starting thread's signal mask: a node started from a thread
        # that blocks SIGTERM/SIGINT (harness.console's loop) would ignore a graceful stop.
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Own process group (so signals reach the whole node), set up by Popen in C:
                # running Python code between fork and exec (preexec_fn) in a process with
                # gRPC threads can crash the child.
                process_group=0,
            )
        finally:
            if mask & _STOP_SIGNALS:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _LIVE.add(self.proc)
        self.paused = False
        self.expected_exit = False
        self.exit_reported = False
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def _reap(self) -> None:
        if self.proc is not None:
            _LIVE.discard(self.proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL: no chance to flush or hand over."""
        if self.proc is None:
            return
        self.expected_exit = True
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.paused = False
        self._reap()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait for a graceful exit (SIGKILL after timeout)."""
        if self.proc is None:
            return None
        self.expected_exit = True
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        self._reap()
        return rc

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False


class LocalCluster:
    """N nodes of one store on 127.0.0.1.

    Each node has a client port (`ports`) and a peer port (`peer_ports`). With `secure`
    (the default) peer traffic is mutual TLS: certificates of a development CA are made in
    `root/certs` (`caplab.security.ensure_dev_certs`, kept across restarts); clients stay
    plaintext on loopback. `secure=False` runs the nodes `--insecure`.

    `peer_addresses` lets a harness route node-to-node traffic through proxies:
    it maps (from_node, to_node) -> address that from_node uses to reach to_node's peer
    port.
    """

    def __init__(
        self,
        store: str,
        n: int,
        root: Path,
        *,
        base_port: int | None = None,
        enable_admin: bool = False,
        log_format: str = "json",
        extra_args: Sequence[str] = (),
        peer_addresses: Mapping[tuple[str, str], str] | None = None,
        ports: Sequence[int] | None = None,
        peer_ports: Sequence[int] | None = None,
        secure: bool = True,
        client_tls: bool = False,
    ) -> None:
        self.store = store
        self.root = Path(root)
        self.secure = secure
        ids = [f"n{i + 1}" for i in range(n)]
        if ports is None and peer_ports is None and not base_port:
            both = free_ports(2 * n)
            ports, peer_ports = both[:n], both[n:]
        if ports is None:
            ports = [base_port + i for i in range(n)] if base_port else free_ports(n)
        if peer_ports is None:
            taken = set(ports)
            peer_ports = (
                [base_port + n + i for i in range(n)]
                if base_port
                else [p for p in free_ports(2 * n) if p not in taken][:n]
            )
        self.peer_ports = dict(zip(ids, peer_ports, strict=True))
        self.certs = self.root / "certs"
        security_args = ["--insecure"]
        self.client_tls = client_tls and secure
        if secure:
            ensure_dev_certs(self.certs, ids)
            security_args = ["--certs", str(self.certs)]
            if client_tls:
                security_args.append("--client-tls")
        self.nodes: dict[str, NodeProcess] = {}
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["CAPLAB_EXIT_WITH_PARENT"] = "1"
        for node_id, port in zip(ids, ports, strict=True):
            peers = []
            for other, other_port in zip(ids, peer_ports, strict=True):
                if other == node_id:
                    continue
                addr = (peer_addresses or {}).get((node_id, other), f"127.0.0.1:{other_port}")
                peers += ["--peer", f"{other}={addr}"]
            args = [
                sys.executable,
                "-m",
                "caplab.cli",
                "node",
                "--store",
                store,
                "--id",
                node_id,
                "--listen",
                f"127.0.0.1:{port}",
                "--peer-listen",
                f"127.0.0.1:{self.peer_ports[node_id]}",
                *security_args,
                "--data-dir",
                str(self.root / "data" / node_id),
                "--log-format",
                log_format,
                *peers,
                *(["--enable-admin"] if enable_admin else []),
                *extra_args,
            ]
            self.nodes[node_id] = NodeProcess(
                node_id,
                port,
                self.root / "data" / node_id,
                self.root / "logs" / f"{node_id}.log",
                args,
                env,
            )

    @property
    def endpoints(self) -> dict[str, str]:
        return {n.node_id: n.address for n in self.nodes.values()}

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    async def wait_ready(
        self, timeout: float = 30.0, nodes: Sequence[str] | None = None, *, serving: bool = False
    ) -> None:
        """Poll gRPC health until every (given) node answers: the process is up. A raft node
        that cannot reach a majority answers NOT_SERVING (e.g. restarted while most of the
        cluster is down), which counts as up unless ``serving`` asks for SERVING."""
        wanted = {health_pb2.HealthCheckResponse.SERVING}
        if not serving:
            wanted.add(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + timeout
        for node_id in nodes or list(self.nodes):
            node = self.nodes[node_id]
            async with self._channel(node.address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while True:
                    if not node.running:
                        raise RuntimeError(
                            f"node {node_id} exited with code {node.proc and node.proc.returncode}"
                            f"; see {node.log_path}"
                        )
                    try:
                        r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                        if r.status in wanted:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"node {node_id} not ready after {timeout}s")
                    await asyncio.sleep(0.05)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if not self.client_tls:
            return grpc.aio.insecure_channel(address)
        ca = (self.certs / "ca.crt").read_bytes()
        return grpc.aio.secure_channel(address, channel_credentials(ca))

    def unexpected_exits(self) -> list[NodeProcess]:
        """Nodes whose process ended by itself since the last call (each reported once; not
        those ended by `kill`/`stop`). Their log files are closed; `start` runs them again."""
        out = []
        for node in self.nodes.values():
            if node.proc is None or node.expected_exit or node.exit_reported:
                continue
            if node.proc.poll() is not None:
                node.exit_reported = True
                node.paused = False
                node._reap()
                out.append(node)
        return out

    def close(self) -> None:
        """Stop every node gracefully, SIGKILL what does not exit."""
        for node in self.nodes.values():
            node.expected_exit = True
            if node.paused:
                node.resume()
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in self.nodes.values():
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
            node._reap()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
