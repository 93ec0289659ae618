"""The node runtime: the grpc.aio servers of one node, shared by both stores.

Serves KV, Cluster, gRPC health checking and reflection, and Admin only with
--enable-admin, on the client listener; the store's peer services (and the requests a
follower forwards to its leader) on the peer listener, or beside the client services
when the node has none (plaintext only). Who may call what: caplab.auth.

On SIGTERM/SIGINT: mark the node NOT_SERVING, let the store hand over (raft leader
transfer), stop accepting and finish in-flight requests within the grace period, then
flush storage.

Health follows the store: a backend with `health() -> (serving, reason)` is asked at start
and then every `HEALTH_POLL_S`, and the gRPC health status of the node (service "") and
of caplab.v1.KV set to SERVING or NOT_SERVING on every change (Watch sees each
transition), with a log line saying why; what NOT_SERVING means per store: kv.proto,
HEALTH. caplab.v1.Cluster (and caplab.v1.Admin, when served) are SERVING while the node
runs: they answer without a quorum. All are NOT_SERVING once shutdown begins.

A backend with `failed_event` (an asyncio.Event) and `failed` (the reason) that sets it
has failed for good: `serve` stops the node and returns exit status 1, so a supervisor
restarts it from its durable state (fail-stop).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from caplab import __version__
from caplab.auth import ClientRoles, MembersOnly
from caplab.clock import SkewableClock
from caplab.errors import Unavailable
from caplab.logs import get_logger
from caplab.security import server_credentials
from caplab.servicer import AdminServicer, ClusterServicer, KVServicer, MalformedRequests
from caplab.store import BackendFactory, NodeConfig, StoreBackend
from caplab.v1 import kv_pb2, kv_pb2_grpc
from caplab.validation import MAX_MESSAGE_BYTES

log = get_logger("caplab.server")

HEALTH_POLL_S = 0.1
EXIT_FAILED = 1

STORES = {"raft": "raft.node", "gossip": "gossip.node"}

MAX_PENDING_CALLS = 20_000  # the raft store's own admission limit (max_pending)
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Peers send keepalive pings every second to notice cut links quickly.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
    # grpc cancels calls that arrived but that the (one-threaded) application has not taken
    # yet beyond 1,000 (soft) / 3,000 (hard): a burst of concurrent calls on one connection
    # came back CANCELLED, an unknown outcome to the client, though never applied. They
    # wait instead; the stores' own admission limits answer RESOURCE_EXHAUSTED (not
    # applied, with the reason), and each call's deadline still bounds its wait.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
]


def load_backend_factory(store: str) -> BackendFactory:
    """The store's `build_backend(config, clock)`; Unavailable with a clear reason if missing."""
    module_name = STORES.get(store)
    if module_name is None:
        raise Unavailable(f"unknown store {store!r}; choose one of: {', '.join(STORES)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise Unavailable(f"the {store} store is not available in this build ({e})") from e
    factory: BackendFactory | None = getattr(module, "build_backend", None)
    if factory is None:
        raise Unavailable(f"the {store} store is not available in this build yet")
    return factory


def _bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Listen on ``address`` (TLS with ``creds``); the port, or Unavailable saying why."""
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        raise Unavailable(f"cannot listen on {address} (address in use?)")
    return port


class NodeServer:
    """A running node: the gRPC server plus its store backend."""

    def __init__(self, config: NodeConfig, backend: StoreBackend, grace_s: float = 5.0) -> None:
        self.config = config
        self.backend = backend
        self.grace_s = grace_s
        client_auth: list[grpc.aio.ServerInterceptor] = []
        if config.client_tokens is not None:
            client_auth.append(ClientRoles(config.client_tokens))
        # (who may call first; then a body that does not decode is INVALID_ARGUMENT)
        self.server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=[*client_auth, MalformedRequests()]
        )
        # The peer listener (``config.peer_listen``): peer services and forwarded requests,
        # members only when the node has certificates (see caplab.auth).
        self.peer_server: grpc.aio.Server | None = None
        if config.peer_listen:
            members: list[grpc.aio.ServerInterceptor] = []
            if config.tls is not None:
                members.append(MembersOnly())
            self.peer_server = grpc.aio.server(
                options=SERVER_OPTIONS, interceptors=[*members, MalformedRequests()]
            )
        self.peer_port = 0
        self._health = health.aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        self.serving: bool | None = None
        # the health service names that follow the store; the others are SERVING while up
        self.store_services = ["", kv_pb2.DESCRIPTOR.services_by_name["KV"].full_name]
        self.port = 0
        self.kv_servicers: list[KVServicer] = []

    async def start(self) -> None:
        # (with a peer listener, forwarded requests arrive there, never here)
        self.kv_servicers = [KVServicer(self.backend, forwarded=not self.config.peer_listen)]
        kv_pb2_grpc.add_KVServicer_to_server(self.kv_servicers[0], self.server)
        kv_pb2_grpc.add_ClusterServicer_to_server(
            ClusterServicer(self.backend, __version__), self.server
        )
        service_names = [
            kv_pb2.DESCRIPTOR.services_by_name["KV"].full_name,
            kv_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name,
        ]
        if self.config.enable_admin:
            kv_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.backend), self.server)
            service_names.append(kv_pb2.DESCRIPTOR.services_by_name["Admin"].full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        service_names += [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(service_names, self.server)
        cfg = self.config
        tls = cfg.tls
        client_creds = None
        if cfg.client_tls:
            if tls is None:
                raise Unavailable("client TLS needs the node's certificate (--certs)")
            client_creds = server_credentials(tls, require_client_auth=cfg.client_certs_required)
        self.port = _bind(self.server, cfg.listen, client_creds)
        peer_server = self.server
        if self.peer_server is not None:
            peer_server = self.peer_server
            creds = None if tls is None else server_credentials(tls, require_client_auth=True)
            self.peer_port = _bind(peer_server, cfg.peer_listen, creds)
            # a follower forwards client requests to its leader over the peer channel
            self.kv_servicers.append(KVServicer(self.backend))
            kv_pb2_grpc.add_KVServicer_to_server(self.kv_servicers[-1], peer_server)
        await self.backend.start(peer_server)
        # every health name answers from the first call on (never NOT_FOUND)
        for name in service_names:
            if name not in self.store_services and name.startswith("caplab."):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._update_health()
        await self.server.start()
        if self.peer_server is not None:
            await self.peer_server.start()
        if hasattr(self.backend, "health"):
            self._health_task = asyncio.create_task(self._watch_health())
        log.info(
            "node_started",
            store=self.config.store,
            listen=self.config.listen,
            peer_listen=self.config.peer_listen or self.config.listen,
            peers=self.config.peers,
            admin=self.config.enable_admin,
            peer_auth="mutual TLS" if tls is not None else "none (insecure)",
            client_tls=self.config.client_tls,
            client_auth=self.config.client_tokens is not None,
        )

    async def stop(self) -> None:
        """Graceful shutdown (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._health_task is not None:
            self._health_task.cancel()
        log.info("node_stopping", grace_s=self.grace_s)
        for kv in self.kv_servicers:  # pipelined operations read from now on never run
            kv.pipelines.drain()
        await self._health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.backend.before_shutdown(), timeout=self.grace_s)
        except TimeoutError:
            log.warning("handover_timed_out")
        self.backend.stop_peer_streams()
        stops = [self.server.stop(self.grace_s)]
        if self.peer_server is not None:
            stops.append(self.peer_server.stop(self.grace_s))
        await asyncio.gather(*stops)
        await self.backend.close()
        log.info("node_stopped")

    async def _update_health(self) -> None:
        """Ask the store whether it can serve; on a change, set the health of the node and
        of the services that follow the store, and log it."""
        check = getattr(self.backend, "health", None)
        serving, reason = (True, "") if check is None else check()
        if serving == self.serving or self._stopped.is_set():
            return
        starting, self.serving = self.serving is None, serving
        status = health_pb2.HealthCheckResponse
        for name in self.store_services:
            await self._health.set(name, status.SERVING if serving else status.NOT_SERVING)
        if serving:
            log.info("health_serving")
        elif starting:  # (a raft node starts so until it hears from a leader)
            log.info("health_not_serving", reason=reason)
        else:
            log.warning("health_not_serving", reason=reason)

    async def _watch_health(self) -> None:
        while not self._stopped.is_set():
            await asyncio.sleep(HEALTH_POLL_S)
            await self._update_health()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(config: NodeConfig, grace_s: float = 5.0) -> int:
    """Run one node in the foreground until SIGTERM/SIGINT (exit status 0) or until its
    store fails for good (exit status 1, the reason logged)."""
    factory = load_backend_factory(config.store)
    clock = SkewableClock()
    backend = factory(config, clock)
    node = NodeServer(config, backend, grace_s)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await node.start()
    watchdog = None
    if os.environ.get("CAPLAB_EXIT_WITH_PARENT") == "1":
        watchdog = asyncio.create_task(_exit_with_parent(stop_requested))
    waits = [asyncio.ensure_future(stop_requested.wait())]
    failed_event: asyncio.Event | None = getattr(backend, "failed_event", None)
    if failed_event is not None:
        waits.append(asyncio.ensure_future(failed_event.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if watchdog is not None:
        watchdog.cancel()
    failed = getattr(backend, "failed", None)
    if failed is not None:
        log.critical("node_exiting", reason=failed, exit_status=EXIT_FAILED)
        node.grace_s = min(node.grace_s, 1.0)
    await node.stop()
    return EXIT_FAILED if failed is not None else 0


async def _exit_with_parent(stop: asyncio.Event, interval: float = 0.5) -> None:
    """Stop when the process that started us is gone (a harness killed by SIGKILL)."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing to await: poll the kernel
        await asyncio.sleep(interval)
    log.warning("parent_exited", parent=parent)
    stop.set()
