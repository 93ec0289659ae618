"""The `caplab` command line.

Exit codes: 0 success; 1 the store refused or failed (one clear line, no
traceback); 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from caplab import __version__, errors
from caplab import loop as caplab_loop

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line; exit code 2."""


def _hostport(text: str) -> str:
    if "://" in text or "/" in text:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, got {text!r}: a gRPC endpoint has no scheme or path "
            "(e.g. 127.0.0.1:7101)"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _peer(text: str) -> tuple[str, str]:
    node_id, sep, addr = text.partition("=")
    if not sep or not node_id:
        raise argparse.ArgumentTypeError(f"expected ID=HOST:PORT, got {text!r}")
    return node_id, _hostport(addr)


def _option(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return k, v


# -- node -----------------------------------------------------------------------
def _add_node(sub: Any) -> None:
    p = sub.add_parser("node", help="run one node in the foreground")
    p.add_argument("--store", choices=["raft", "gossip"], required=True)
    p.add_argument("--id", required=True, help="this node's id (unique in the cluster)")
    p.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    p.add_argument(
        "--peer",
        type=_peer,
        action="append",
        default=[],
        metavar="ID=HOST:PORT",
        help="another member of the cluster (repeat for each)",
    )
    p.add_argument("--data-dir", required=True, help="where this node keeps its durable state")
    p.add_argument(
        "--peer-listen",
        type=_hostport,
        default="",
        metavar="HOST:PORT",
        help="where peers reach this node (required with --certs; --peer addresses name "
        "the other nodes' peer listeners); default: beside the clients on --listen",
    )
    p.add_argument(
        "--certs",
        default="",
        metavar="DIR",
        help="certificates made by `caplab certs`: the peer listener then requires mutual TLS "
        "with a member certificate of DIR/ca.crt, and peer channels present nodes/ID.crt",
    )
    p.add_argument(
        "--client-tls", action="store_true", help="serve clients over TLS too (needs --certs)"
    )
    p.add_argument(
        "--client-auth",
        action="store_true",
        help="clients must send a bearer token (DIR/tokens.json) or a client certificate "
        "(needs --certs); roles: read-only, read-write, admin",
    )
    p.add_argument(
        "--client-cert-auth",
        action="store_true",
        help="with --client-tls: clients must present a client certificate of DIR/ca.crt "
        "(its OU is the role); without it, TLS clients authenticate by token",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run without certificates: peer traffic unauthenticated (any client could "
        "speak as a member), clients in plaintext even on a non-loopback address",
    )
    p.add_argument(
        "--enable-admin", action="store_true", help="serve the Admin fault-injection service"
    )
    p.add_argument("--log-format", choices=["console", "json"], default="console")
    p.add_argument("--log-level", default="info")
    p.add_argument("--grace", type=float, default=5.0, help="shutdown grace period in seconds")
    p.add_argument(
        "--set",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="options",
        help="store tuning, e.g. --set heartbeat_ms=50 (see the store's docs)",
    )
    p.set_defaults(func=_cmd_node)


def _cmd_node(args: argparse.Namespace) -> int:
    from caplab.logs import configure_logging
    from caplab.server import load_backend_factory, serve
    from caplab.store import NodeConfig

    peers = dict(args.peer)
    if args.id in peers:
        raise UsageError(f"--peer lists this node's own id {args.id!r}")
    if len(peers) != len(args.peer):
        raise UsageError("--peer lists the same node id twice")
    configure_logging(args.log_format, node_id=args.id, level=args.log_level)
    load_backend_factory(args.store)  # fail fast with a clear message
    tls, tokens = _node_security(args)
    config = NodeConfig(
        store=args.store,
        node_id=args.id,
        listen=args.listen,
        peers=peers,
        data_dir=args.data_dir,
        enable_admin=args.enable_admin,
        options=dict(args.options),
        peer_listen=args.peer_listen,
        tls=tls,
        client_tls=args.client_tls,
        client_tokens=tokens,
        client_certs_required=args.client_cert_auth,
    )
    return caplab_loop.run(serve(config, grace_s=args.grace))


def _node_security(args: argparse.Namespace) -> tuple[Any, Any]:
    """(member TLS files or None, client tokens or None) from the node's flags; refuses
    unsafe combinations with the reason and the way out."""
    from caplab.logs import get_logger
    from caplab.security import SecurityError, is_loopback, load_node_tls, load_tokens

    log = get_logger("caplab.cli")
    if args.insecure and args.certs:
        raise UsageError("--insecure and --certs contradict each other: pick one")
    if not args.certs:
        if not args.insecure:
            raise UsageError(
                "peer traffic must be authenticated: pass --certs DIR (make one with "
                "`caplab certs --dir DIR --node ID ...`) and --peer-listen HOST:PORT, or run "
                "unauthenticated with --insecure"
            )
        if args.client_tls or args.client_auth or args.client_cert_auth:
            raise UsageError("--client-tls, --client-auth and --client-cert-auth need --certs DIR")
        if not is_loopback(args.listen) or (args.peer_listen and not is_loopback(args.peer_listen)):
            log.warning(
                "insecure_on_network",
                listen=args.listen,
                peer_listen=args.peer_listen or args.listen,
                why="--insecure: anyone who can reach these addresses can read, write and "
                "speak as a member",
            )
        return None, None
    if not args.peer_listen:
        raise UsageError("with --certs, peers need their own listener: --peer-listen HOST:PORT")
    if not is_loopback(args.listen) and not args.client_tls:
        raise UsageError(
            f"refusing to serve clients in plaintext on {args.listen} (not a loopback "
            "address): add --client-tls (and --client-auth), or --insecure"
        )
    if args.client_cert_auth and not args.client_tls:
        raise UsageError("--client-cert-auth needs --client-tls (certificates travel in TLS)")
    certs = Path(args.certs)
    try:
        tls = load_node_tls(certs, args.id)
        auth = args.client_auth or args.client_cert_auth
        tokens = load_tokens(certs / "tokens.json") if auth else None
    except SecurityError as e:
        raise errors.FailedPrecondition(str(e)) from None
    if not is_loopback(args.listen) and not args.client_auth:
        log.warning(
            "clients_unauthenticated",
            listen=args.listen,
            why="clients are not authenticated on a network address: add --client-auth",
        )
    return tls, tokens


# -- certs ----------------------------------------------------------------------
def _client_role(text: str) -> tuple[str, str]:
    name, sep, role = text.partition("=")
    if not sep or not name or not role:
        raise argparse.ArgumentTypeError(f"expected NAME=ROLE, got {text!r}")
    return name, role


def _add_certs(sub: Any) -> None:
    p = sub.add_parser(
        "certs",
        help="make a development CA, node and client certificates, and client tokens",
        description="Creates what is missing in DIR (an existing CA is kept): the CA "
        "(ca.crt, ca.key), a member certificate per --node (nodes/ID.crt, .key; valid for "
        "ID, localhost, 127.0.0.1 and each --host), and a certificate and bearer token per "
        "--client (clients/NAME.crt, .key, .token; roles read-only, read-write, admin). "
        "Without --client: admin, writer (read-write) and reader (read-only).",
    )
    p.add_argument("--dir", required=True, help="where the certificates live")
    p.add_argument("--node", action="append", default=[], metavar="ID", help="a node id")
    p.add_argument("--client", type=_client_role, action="append", default=[], metavar="NAME=ROLE")
    p.add_argument(
        "--host", action="append", default=[], help="another name or IP the nodes answer on"
    )
    p.set_defaults(func=_cmd_certs)


def _cmd_certs(args: argparse.Namespace) -> int:
    from caplab import security

    root = Path(args.dir)
    clients = dict(args.client) or security.DEFAULT_CLIENTS
    for name, role in clients.items():
        if role not in security.ROLES:
            raise UsageError(
                f"client {name!r}: unknown role {role!r}; use one of {', '.join(security.ROLES)}"
            )
    try:
        security.create_ca(root)
        for node_id in args.node:
            security.create_node_cert(root, node_id, hosts=args.host)
        security.ensure_dev_certs(root, [], clients)
    except security.SecurityError as e:
        raise errors.FailedPrecondition(str(e)) from None
    for path in sorted(root.rglob("*.crt")):
        print(f"{path.relative_to(root)}: {security.cert_summary(path.read_bytes())}")
    print(f"bearer tokens: {root}/clients/NAME.token (their hashes in {root}/tokens.json)")
    return EXIT_OK


# -- cluster --------------------------------------------------------------------
def _add_cluster(sub: Any) -> None:
    p = sub.add_parser("cluster", help="run N local nodes in the foreground until Ctrl-C")
    p.add_argument("--store", choices=["raft", "gossip"], required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=None, help="first port (default: free ports)")
    p.add_argument("--data-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--enable-admin", action="store_true")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS between the nodes (default: mutual TLS, certificates made in DATA_DIR/certs)",
    )
    p.set_defaults(func=_cmd_cluster)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from harness.cluster import LocalCluster

    if not 1 <= args.nodes <= 15:
        raise UsageError("--nodes must be between 1 and 15")
    root = Path(args.data_dir or tempfile.mkdtemp(prefix=f"caplab-{args.store}-"))
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalCluster(
        args.store,
        args.nodes,
        root,
        base_port=args.base_port,
        enable_admin=args.enable_admin,
        secure=not args.insecure,
    ) as cluster:
        cluster.start()
        asyncio.run(cluster.wait_ready())
        eps = cluster.endpoints
        print(f"{args.store} cluster of {args.nodes} nodes; data and logs in {root}")
        if cluster.secure:
            print(
                f"peer traffic: mutual TLS (certificates in {cluster.certs}; client tokens in "
                f"{cluster.certs / 'clients'})"
            )
        else:
            print("peer traffic: NOT authenticated (--insecure)")
        for node_id, ep in eps.items():
            print(f"  {node_id}  {ep}")
        flags = " ".join(f"--endpoint {ep}" for ep in eps.values())
        print(f"try: caplab kv {flags} put hello world")
        print("Ctrl-C stops every node.", flush=True)
        while not stop:
            for node in cluster.nodes.values():
                if not node.running:
                    print(f"node {node.node_id} exited; see {node.log_path}", file=sys.stderr)
                    return EXIT_FAILED
            time.sleep(0.2)
        print("stopping...", flush=True)
    return EXIT_OK


# -- kv -------------------------------------------------------------------------
def _client_security(args: argparse.Namespace) -> tuple[Any, str | None]:
    """(TLS channel credentials or None, bearer token or None) from `caplab kv` flags."""
    import grpc

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None

    if (args.cert_file is None) != (args.key_file is None):
        raise UsageError("--cert and --key go together")
    if args.cert_file is not None and args.ca is None:
        raise UsageError("--cert needs --ca (certificates travel over TLS)")
    creds = None
    if args.ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca),
            private_key=read(args.key_file) if args.key_file else None,
            certificate_chain=read(args.cert_file) if args.cert_file else None,
        )
    token = read(args.token_file).decode().strip() if args.token_file else None
    return creds, token


def _add_kv(sub: Any) -> None:
    p = sub.add_parser("kv", help="talk to a cluster")
    p.add_argument(
        "--endpoint",
        type=_hostport,
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a node to talk to (repeat for more); default: $CAPLAB_ENDPOINT (comma-separated)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline per attempt (s)")
    p.add_argument("--retries", type=int, default=2, help="retries of definite failures")
    p.add_argument("--ca", metavar="FILE", help="TLS: the cluster's CA certificate (ca.crt)")
    p.add_argument(
        "--cert", dest="cert_file", metavar="FILE", help="TLS: a client certificate (with --key)"
    )
    p.add_argument(
        "--key", dest="key_file", metavar="FILE", help="TLS: the client certificate's key"
    )
    p.add_argument(
        "--token-file", metavar="FILE", help="send the bearer token in FILE (clients/NAME.token)"
    )
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    o = ops.add_parser("put", help="write a register")
    o.add_argument("key")
    o.add_argument("value")
    o = ops.add_parser("get", help="read a key")
    o.add_argument("key")
    o.add_argument(
        "--local", action="store_true", help="answer from the contacted node (may be stale)"
    )
    o.add_argument("--linearizable", action="store_true", help="insist on a linearizable read")
    o = ops.add_parser("delete", help="delete a key")
    o.add_argument("key")
    o = ops.add_parser(
        "cas", help="compare-and-swap (EXPECTED '-' with --absent: key must be absent)"
    )
    o.add_argument("key")
    o.add_argument("expected")
    o.add_argument("new")
    o.add_argument("--absent", action="store_true", help="expect the key to be absent")
    o = ops.add_parser("incr", help="add DELTA (default 1) to a counter")
    o.add_argument("key")
    o.add_argument("delta", nargs="?", type=int, default=1)
    ops.add_parser("status", help="the contacted node's view of the cluster")
    p.set_defaults(func=_cmd_kv)


def _header(h: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"node": h.node_id}
    if h.term or h.index:
        out.update(term=h.term, index=h.index)
    if h.HasField("hlc"):
        out["hlc"] = f"{h.hlc.wall_ms}.{h.hlc.logical}@{h.hlc.node_id}"
    if h.stale_possible:
        out["stale_possible"] = True
    if h.forwarded_by:
        out["forwarded_by"] = h.forwarded_by
    return out


def _decode(v: bytes) -> str:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + v.hex()


async def _kv(args: argparse.Namespace) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    from caplab.client import KVClient
    from caplab.v1 import kv_pb2

    creds, token = _client_security(args)
    async with KVClient(
        args.endpoint, timeout=args.timeout, retries=args.retries, credentials=creds, token=token
    ) as c:
        if args.op == "put":
            r = await c.put(args.key, args.value.encode())
            return {"ok": True, "op": "put", "key": args.key, **_header(r.header)}
        if args.op == "get":
            if args.local and args.linearizable:
                raise UsageError("--local and --linearizable exclude each other")
            level = (
                kv_pb2.CONSISTENCY_LOCAL
                if args.local
                else kv_pb2.CONSISTENCY_LINEARIZABLE
                if args.linearizable
                else kv_pb2.CONSISTENCY_DEFAULT
            )
            g = await c.get(args.key, level)
            value = _decode(g.value) if isinstance(g.value, bytes) else g.value
            return {
                "ok": True,
                "op": "get",
                "key": args.key,
                "found": g.found,
                "value": value,
                **_header(g.header),
            }
        if args.op == "delete":
            d = await c.delete(args.key)
            return {
                "ok": True,
                "op": "delete",
                "key": args.key,
                "existed": d.existed,
                **_header(d.header),
            }
        if args.op == "cas":
            expected = None if args.absent else args.expected.encode()
            s = await c.cas(args.key, expected, args.new.encode())
            return {
                "ok": True,
                "op": "cas",
                "key": args.key,
                "swapped": s.swapped,
                "current": _decode(s.current) if s.found else None,
                **_header(s.header),
            }
        if args.op == "incr":
            i = await c.increment(args.key, args.delta)
            return {
                "ok": True,
                "op": "incr",
                "key": args.key,
                "value": i.value,
                **_header(i.header),
            }
        st = await c.status()
        return {
            "ok": True,
            "op": "status",
            "status": MessageToDict(st, preserving_proto_field_name=True),
        }


def _print_kv(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    op = result["op"]
    if op == "get":
        print(result["value"] if result["found"] else "(absent)")
    elif op == "cas":
        print("swapped" if result["swapped"] else f"not swapped; current: {result['current']}")
    elif op == "incr":
        print(result["value"])
    elif op == "status":
        print(json.dumps(result["status"], indent=2, sort_keys=True))
    elif op == "delete":
        print("deleted" if result["existed"] else "deleted (was absent)")
    else:
        print("ok")


def _endpoints(args: argparse.Namespace) -> list[str]:
    """--endpoint, else $CAPLAB_ENDPOINT; a usage error saying how if neither is set."""
    import os

    if args.endpoint:
        return list(args.endpoint)
    env = os.environ.get("CAPLAB_ENDPOINT", "").strip()
    if not env:
        raise UsageError("no endpoint: pass --endpoint HOST:PORT or set CAPLAB_ENDPOINT")
    try:
        return [_hostport(e.strip()) for e in env.split(",") if e.strip()]
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"CAPLAB_ENDPOINT: {e}") from None


def _cmd_kv(args: argparse.Namespace) -> int:
    args.endpoint = _endpoints(args)
    try:
        result = asyncio.run(_kv(args))
    except errors.StoreError as e:
        kind = "refused" if e.definite else "outcome unknown"
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "op": args.op,
                        "code": e.code.name,
                        "definite": e.definite,
                        "error": e.message,
                    }
                )
            )
        else:
            print(f"caplab: {kind} ({e.code.name}): {e.message}", file=sys.stderr)
        return EXIT_FAILED
    _print_kv(result, args.json)
    return EXIT_OK


# -- main -----------------------------------------------------------------------
Registrar = Callable[[Any], None]


def _registrars() -> list[Registrar]:
    regs: list[Registrar] = [_add_node, _add_certs, _add_cluster, _add_kv]
    # Later subcommands live with the code they drive.
    import importlib

    for module_name in ("harness.cli", "harness.bench", "harness.demo"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        regs.extend(module.REGISTRARS)
    return regs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="caplab",
        description="See the CAP trade-off: a Raft (CP) and a gossip (AP) key-value store, "
        "side by side.",
    )
    parser.add_argument("--version", action="version", version=f"caplab {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for reg in _registrars():
        reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except UsageError as e:
        print(f"caplab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except errors.StoreError as e:
        print(f"caplab: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
