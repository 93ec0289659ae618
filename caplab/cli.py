"""The `caplab` command line.

Exit codes: 0 success; 1 the store refused or failed (one clear line, no
traceback); 2 usage errors; 130 interrupted.

Module-level imports stay at the standard library's argparse level (and caplab.kvcli,
which is no heavier): every command imports what it drives when it runs, and
`caplab kv ...` does not even register the harness's commands, so that a kv call starts
in a fraction of a second (tests/foundation/test_cli.py checks what it imports).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from caplab import __version__
from caplab.kvcli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, add_kv
from caplab.kvcli import hostport as _hostport

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]


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
def _add_set(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument(
        "--set",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="options",
        help=help_text,
    )


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
        default=None,
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
    _add_set(p, "store tuning, e.g. --set heartbeat_ms=50 (see the store's docs)")
    p.set_defaults(func=_cmd_node)


def _cmd_node(args: argparse.Namespace) -> int:
    from caplab import loop as caplab_loop
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
        peer_listen=args.peer_listen or "",
        tls=tls,
        client_tls=args.client_tls,
        client_tokens=tokens,
        client_certs_required=args.client_cert_auth,
    )
    return caplab_loop.run(serve(config, grace_s=args.grace))


def _node_security(args: argparse.Namespace) -> tuple[Any, Any]:
    """(member TLS files or None, client tokens or None) from the node's flags; refuses
    unsafe combinations with the reason and the way out."""
    from caplab import errors
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
    from caplab import errors, security

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
    p = sub.add_parser(
        "cluster",
        help="run N local nodes in the foreground until Ctrl-C, with a console on a terminal",
    )
    p.add_argument("--store", choices=["raft", "gossip"], required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=None, help="first port (default: free ports)")
    p.add_argument("--data-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument(
        "--enable-admin", action="store_true", help="serve Admin (always on with the console)"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS between the nodes (default: mutual TLS, certificates made in DATA_DIR/certs)",
    )
    p.add_argument(
        "--console",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a caplab> prompt to inspect the nodes and inject faults (status, kill, "
        "partition, ...; peer links then go through local proxies); default: when stdin "
        "is a terminal",
    )
    _add_set(p, "store tuning passed to every node (see `caplab node --set`)")
    p.set_defaults(func=_cmd_cluster)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from harness.console import ClusterOptions, run_console, run_headless

    if not 1 <= args.nodes <= 15:
        raise UsageError("--nodes must be between 1 and 15")
    opts = ClusterOptions(
        store=args.store,
        nodes=args.nodes,
        root=Path(args.data_dir or tempfile.mkdtemp(prefix=f"caplab-{args.store}-")),
        base_port=args.base_port,
        enable_admin=args.enable_admin,
        secure=not args.insecure,
        extra_args=tuple(f"--set={k}={v}" for k, v in args.options),
    )
    console = args.console if args.console is not None else sys.stdin.isatty()
    return run_console(opts) if console else run_headless(opts)


# -- main -----------------------------------------------------------------------
Registrar = Callable[[Any], None]


CORE_COMMANDS = ("node", "certs", "cluster", "kv")


def _registrars(command: str | None = None) -> list[Registrar]:
    """The subcommands' registrars; only caplab's own when ``command`` is one of them (the
    harness's modules import matplotlib, rich, yaml...: seconds of start-up)."""
    regs: list[Registrar] = [_add_node, _add_certs, _add_cluster, add_kv]
    if command in CORE_COMMANDS:
        return regs
    # Later subcommands live with the code they drive.
    import importlib

    for module_name in (
        "harness.cli",
        "harness.bench",
        "harness.demo",
        "harness.spectrum.run",
        "harness.train.run",
    ):
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


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (`caplab` itself takes no option with a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `caplab`; given ``argv``, only what parsing it needs."""
    parser = _Parser(
        prog="caplab",
        description="See the CAP trade-off: a Raft (CP) and a gossip (AP) key-value store, "
        "side by side.",
    )
    parser.add_argument("--version", action="version", version=f"caplab {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for reg in _registrars(None if argv is None else _command_word(argv)):
        reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except UsageError as e:
        print(f"caplab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        # a StoreError if caplab.errors was imported at all (it imports grpc: not here)
        errors = sys.modules.get("caplab.errors")
        if errors is not None and isinstance(e, errors.StoreError):
            print(f"caplab: {e.message}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    raise SystemExit(main())
