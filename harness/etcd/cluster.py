"""A local etcd cluster on 127.0.0.1, driven over gRPC like caplab's own stores.

Only `caplab bench --compare etcd` uses it: the same grpc.aio client code runs against a
real 3-member etcd cluster, for a reference point next to the Raft store. The messages are
a wire-compatible subset of etcd's API (proto/harness/etcd/rpc.proto).

Each member gets free client and peer ports, its own data directory and a log file in it
(`<root>/<name>/etcd.log`). The cluster keeps etcd's default durability (fsync on every
commit; --unsafe-no-fsync is never passed), so its numbers compare with a store that
fsyncs too. No member outlives the cluster: they run through `harness.cluster.NodeProcess`
(own process group, killed by an atexit hook), and `stop()` waits for every one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from harness.cluster import NodeProcess, free_ports
from harness.etcd import rpc_pb2, rpc_pb2_grpc

INSTALL_HINT = (
    "etcd is not installed: `caplab bench --compare etcd` needs the `etcd` server binary on "
    "PATH. On Debian/Ubuntu: `sudo apt-get install etcd-server` (the binary is `etcd`); "
    "elsewhere, a release from https://github.com/etcd-io/etcd/releases (v3.4 or later)."
)

_LOG_TAIL_LINES = 20


def etcd_binary() -> str | None:
    """The path of the `etcd` server binary on PATH, None if there is none."""
    return shutil.which("etcd")


class EtcdExitedError(RuntimeError):
    """An etcd member exited by itself (e.g. a port taken, a bad flag)."""


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    node: NodeProcess

    @property
    def endpoint(self) -> str:
        """host:port of the member's gRPC (client) listener."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.node.log_path

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])


class EtcdCluster:
    """N etcd members (default 3) on 127.0.0.1 with a static initial cluster.

    `start()` (or entering the context) launches every member; `await wait_ready()` waits
    until all of them know the same leader; `stop()` (or leaving the context) ends them:
    SIGTERM, then SIGKILL if one is still running a few seconds later, and waits for every
    process.
    """

    def __init__(
        self,
        root: Path,
        n: int = 3,
        *,
        binary: str | None = None,
        log_level: str = "warn",
        extra_args: Sequence[str] = (),
    ) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.binary = found
        self.root = Path(root)
        ports = free_ports(2 * n)
        names = [f"etcd{i + 1}" for i in range(n)]
        # a token of its own: members of another cluster (another engineer's, a previous
        # run's) that happen to reach these ports are refused instead of joining
        token = f"caplab-{uuid.uuid4().hex[:12]}"
        # etcd also reads its flags from ETCD_* variables, and refuses to start when one
        # shadows a flag given here: the members see none of them
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self.members: list[EtcdMember] = []
        for i, name in enumerate(names):
            client_port, peer_port = ports[i], ports[n + i]
            data_dir = self.root / name
            member = EtcdMember(
                name,
                client_port,
                peer_port,
                NodeProcess(name, client_port, data_dir, data_dir / "etcd.log", [], env),
            )
            self.members.append(member)
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.node.args = [
                self.binary,
                "--name",
                m.name,
                "--data-dir",
                str(m.node.data_dir / "data"),
                "--listen-client-urls",
                m.client_url,
                "--advertise-client-urls",
                m.client_url,
                "--listen-peer-urls",
                m.peer_url,
                "--initial-advertise-peer-urls",
                m.peer_url,
                "--initial-cluster",
                initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                token,
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",  # into the member's log file (NodeProcess redirects it)
                "--log-level",
                log_level,
                *extra_args,
            ]

    @property
    def endpoints(self) -> list[str]:
        """The members' gRPC addresses, "127.0.0.1:port", in member order."""
        return [m.endpoint for m in self.members]

    @property
    def pids(self) -> list[int]:
        """The process ids of the members started (running or not yet reaped)."""
        return [m.node.proc.pid for m in self.members if m.node.proc is not None]

    def start(self) -> None:
        """Launch every member that is not running."""
        self.root.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            m.node.start()

    def check_running(self) -> None:
        """Raise EtcdExitedError, with the tail of its log, if a member has exited."""
        for m in self.members:
            rc = m.node.returncode
            if m.node.proc is not None and rc is not None:
                raise EtcdExitedError(
                    f"etcd member {m.name} ({m.endpoint}) exited with code {rc}; "
                    f"last lines of {m.log_path}:\n{m.log_tail()}"
                )

    async def _status(self, endpoint: str, timeout: float) -> rpc_pb2.StatusResponse:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = rpc_pb2_grpc.MaintenanceStub(channel)
            return await stub.Status(rpc_pb2.StatusRequest(), timeout=timeout)

    async def _leaders(self, timeout: float) -> dict[str, tuple[int, int]]:
        """endpoint -> (member_id, leader id it knows, 0 for none); members that do not
        answer within `timeout` are left out."""

        async def one(endpoint: str) -> tuple[str, tuple[int, int] | None]:
            try:
                r = await self._status(endpoint, timeout)
            except grpc.aio.AioRpcError:
                return endpoint, None
            return endpoint, (r.header.member_id, r.leader)

        answers = await asyncio.gather(*(one(e) for e in self.endpoints))
        return {e: a for e, a in answers if a is not None}

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll Maintenance.Status on every member until all answer and name the same,
        non-zero leader. Raises EtcdExitedError if a member exits, TimeoutError after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"etcd cluster not ready (no leader known to every member) after "
                    f"{timeout}s; logs in {self.root}/*/etcd.log"
                )
            known = await self._leaders(min(1.0, max(0.05, remaining)))
            leaders = {leader for _, leader in known.values()}
            if len(known) == len(self.members) and len(leaders) == 1 and 0 not in leaders:
                return
            await asyncio.sleep(0.05)

    async def leader_endpoint(self, timeout: float = 10.0) -> str:
        """The endpoint of the member that is the leader now (by Maintenance.Status:
        the member whose header.member_id is the leader a member reports). Polls until
        one is found; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no etcd leader found after {timeout}s")
            known = await self._leaders(min(1.0, max(0.05, remaining)))
            ids = {member_id: e for e, (member_id, _) in known.items()}
            for _, leader in known.values():
                if leader in ids:
                    return ids[leader]
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """End every member, one after the other: SIGTERM, SIGKILL if it is still running
        after `timeout` seconds, and wait for the process.

        One at a time because that is fast (about 0.2 s in all): SIGTERM to all members at
        once kept each of them (etcd 3.4.23) busy for about 7 s, the leader trying to hand
        over to followers that were going away too.
        """
        for m in self.members:
            m.node.stop(timeout)

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kv_stub(channel: grpc.aio.Channel) -> rpc_pb2_grpc.KVAsyncStub:
    """etcd's KV service over a grpc.aio channel (e.g. grpc.aio.insecure_channel(endpoint))."""
    return rpc_pb2_grpc.KVStub(channel)


async def etcd_put(stub: rpc_pb2_grpc.KVAsyncStub, key: bytes, value: bytes, timeout: float) -> int:
    """Put key=value; returns the store's revision after the put."""
    r = await stub.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=timeout)
    return r.header.revision


async def etcd_range(stub: rpc_pb2_grpc.KVAsyncStub, key: bytes, timeout: float) -> bytes | None:
    """Linearizable read (serializable=False: etcd confirms its leadership through a quorum
    before answering) of one key; None if the key does not exist."""
    r = await stub.Range(rpc_pb2.RangeRequest(key=key, serializable=False), timeout=timeout)
    return r.kvs[0].value if r.kvs else None
