"""`caplab kv`: talk to a cluster from a shell, etcdctl-style; and the small pieces every
`caplab` command shares (:class:`UsageError`, the exit codes, HOST:PORT parsing).

Start-up matters for a command typed (or scripted) hundreds of times: this module imports
nothing but the standard library at module level. grpc, the generated code and
:mod:`caplab.client` are imported when a kv command runs, and nothing of the harness
(matplotlib, rich, yaml, cryptography) ever is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caplab.client import KVClient
    from caplab.v1 import kv_pb2

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130

# `caplab cluster` picks free ports unless given --base-port; the README's examples start
# it with --base-port 7001, whose first node this is.
DEFAULT_ENDPOINT = "127.0.0.1:7001"
ENV_ENDPOINTS = "CAPLAB_ENDPOINTS"
ENV_ENDPOINT_ALIAS = "CAPLAB_ENDPOINT"  # the older, singular name; still read


class UsageError(Exception):
    """Bad command line; exit code 2."""


def hostport(text: str) -> str:
    """``HOST:PORT`` as gRPC takes it, or :class:`argparse.ArgumentTypeError` saying how
    to fix it (a URL's scheme or path is the usual mistake)."""
    scheme, sep, rest = text.partition("://")
    if sep:
        example = rest.split("/")[0] or DEFAULT_ENDPOINT
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, got {text!r}: give host:port, without {scheme}:// "
            f"(a gRPC endpoint has no scheme or path), e.g. {example}"
        )
    if "/" in text:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, got {text!r}: give host:port, without a path "
            f"(a gRPC endpoint has no scheme or path), e.g. {text.split('/')[0]}"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


# -- the command line -------------------------------------------------------------
EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    success (a `get` of an absent key too: it prints "(absent)"; with --json,
       "found": false)
  {EXIT_FAILED}    the operation failed; one line on stderr (with --json, one object on stdout:
       "ok": false, "code", "definite") says which of:
         refused, not applied   the store refused it before applying anything
                                (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE,
                                RESOURCE_EXHAUSTED, UNAVAILABLE marked not-applied),
                                or nothing was listening (connection refused, name not
                                resolved: UNAVAILABLE, not applied): safe to retry
         outcome unknown        it may or may not have been applied (timeout, connection
                                lost mid-call, UNKNOWN/INTERNAL): read before retrying
  {EXIT_USAGE}    usage error (bad flag, bad endpoint, unreadable file, a value over 1 MiB);
       nothing was sent
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); stderr says "interrupted", and for a write "outcome
       unknown": it may have been applied"""

KV_EPILOG = f"""\
endpoints:
  --endpoint HOST:PORT (repeat it for several nodes), else ${ENV_ENDPOINTS} (comma-separated,
  like ETCDCTL_ENDPOINTS; ${ENV_ENDPOINT_ALIAS} is read too), else {DEFAULT_ENDPOINT}: the
  first node of `caplab cluster --base-port 7001` (without --base-port, the cluster picks
  free ports and prints them). Requests go to the first endpoint and move to the next one
  after a refusal that applied nothing.

flags:
  The connection and output flags may come before or after OP:
  `caplab kv --json get k` and `caplab kv get k --json` are the same.

values:
  put KEY VALUE         VALUE as given (UTF-8)
  put KEY -             the bytes of standard input, as they are (a trailing newline too)
  put KEY --file PATH   the bytes of PATH
  put KEY -- -5         a value starting with '-' after `--` (`--` ends the flags,
                        wherever it is: `put KEY --json -- -5` too)
  Values are at most 1 MiB (a larger one is a usage error, before anything is read
  beyond the limit). `get` prints a value as UTF-8 text, or as 0x-prefixed hex when it
  is not UTF-8 (so the text "0x6869" and the bytes "hi" look alike there); with --json
  it is unambiguous: "value" is the text and "encoding" is "utf-8" when it is valid
  UTF-8, else "value_hex" is the hex (no 0x) and "encoding" is "hex"; a counter's "value"
  is a number, with "type": "counter". cas --json shows the current value the same way
  ("current" or "current_hex", and "current_encoding").

{EXIT_CODES}

examples:
  caplab cluster --store raft --base-port 7001      # nodes on 7001-7003
  caplab kv put greeting hello                      # to {DEFAULT_ENDPOINT}
  caplab kv get greeting --endpoint 127.0.0.1:7002
  head -c 1048576 /dev/urandom | caplab kv put blob -
  CAPLAB_ENDPOINTS=127.0.0.1:7001,127.0.0.1:7002 caplab kv status"""

OPS_HELP = {
    "put": ("write a register", "Write KEY's register (a counter key refuses it)."),
    "get": (
        "read a key",
        "Read KEY: a register prints its value, a counter its number. The store's own "
        "consistency by default: linearizable on raft, this node's state on gossip.",
    ),
    "delete": ("delete a key", "Delete KEY (a register or a counter)."),
    "cas": (
        "compare-and-swap (raft only)",
        "Set KEY to NEW if it holds EXPECTED (or, with --absent, if it is absent; EXPECTED "
        "is then ignored, write '-'). Prints 'swapped' or the current value. The gossip "
        "store refuses it (FAILED_PRECONDITION).",
    ),
    "incr": ("add DELTA (default 1) to a counter", "Add DELTA (may be negative) to KEY's counter."),
    "status": (
        "the contacted node's view of the cluster",
        "The node of the first endpoint that answers: its role, term and leader (raft), "
        "log indexes, keys, members and their states, clock (gossip), injected clock "
        "skew, version. The leader's and the members' addresses shown are their peer "
        "addresses (members only), not client endpoints. --json prints the StatusResponse "
        "as JSON.",
    ),
}


class _OpParser(argparse.ArgumentParser):
    """The parser of one operation (`caplab kv put ...`). Flags and operands may be mixed
    in any order, and ``--`` ends the flags wherever it is: everything after it is an
    operand, so a value starting with '-' works (`put k --json -- -5`). argparse alone
    fills an optional operand (put's VALUE, incr's DELTA) with nothing when a flag comes
    between it and the KEY, and (Python 3.13.0) drops a value that is itself '--'. A
    usage error is reported by this parser, with this operation's usage."""

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        head, tail = argv, []
        if "--" in argv:
            cut = argv.index("--")
            head, tail = argv[:cut], argv[cut + 1 :]
        operands = self._get_positional_actions()
        saved = [(a.nargs, a.default) for a in operands]
        usage = self.usage
        if usage is None:  # with the operands, in the errors of the first pass too
            self.usage = self.format_usage().removeprefix("usage: ").rstrip("\n")
        try:
            for a in operands:  # the flags first, with the operands switched off
                a.nargs, a.default = argparse.SUPPRESS, argparse.SUPPRESS
            ns, rest = super().parse_known_args(head, namespace)
        finally:
            for a, (nargs, default) in zip(operands, saved, strict=True):
                a.nargs, a.default = nargs, default
            self.usage = usage
        unknown = [w for w in rest if w[:1] == "-" and w != "-" and not _NEGATIVE_NUMBER.match(w)]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        words = [*rest, *tail]
        missing = []
        for a in operands:
            if words:
                try:
                    setattr(ns, a.dest, self._get_value(a, words.pop(0)))
                except argparse.ArgumentError as e:
                    self.error(str(e))
            elif a.nargs == "?":
                setattr(ns, a.dest, a.default)
            else:
                missing.append(str(a.metavar or a.dest))
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        if words:
            self.error(f"unrecognized arguments: {' '.join(words)}")
        return ns, []


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's: an operand, not a flag


def _common_flags(after_op: bool) -> argparse.ArgumentParser:
    """The flags every kv operation takes, as a parent parser. Added twice: to `kv` (before
    OP) with their defaults, and to each OP (after it) with no defaults, so that a flag
    given before OP is not reset by the OP's parser; --endpoint after OP collects into its
    own list, appended to the one before OP."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_op else value

    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_argument_group("connection and output (before or after OP)")
    g.add_argument(
        "--endpoint",
        dest="endpoint_after_op" if after_op else "endpoint",
        type=hostport,
        action="append",
        default=default(None),
        metavar="HOST:PORT",
        help=f"a node to talk to (repeat for more); default: ${ENV_ENDPOINTS}, else "
        f"{DEFAULT_ENDPOINT}",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON object (errors too, on stdout)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=default(5.0),
        metavar="SECONDS",
        help="deadline of each attempt (default: 5)",
    )
    g.add_argument(
        "--session-token",
        default=default(None),
        metavar="HEX",
        help="act as one session (SESSION, READ_MY_WRITES, MONOTONIC_READS): send this "
        "token, the 'session_token' a previous call printed with --json",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=default(2),
        metavar="N",
        help="retries after a failure that applied nothing, or of a write whose outcome is "
        "unknown (the store applies it at most once); default: 2",
    )
    g.add_argument(
        "--ca", default=default(None), metavar="FILE", help="TLS: the cluster's CA (ca.crt)"
    )
    g.add_argument(
        "--cert",
        dest="cert_file",
        default=default(None),
        metavar="FILE",
        help="TLS: a client certificate (with --key and --ca)",
    )
    g.add_argument(
        "--key",
        dest="key_file",
        default=default(None),
        metavar="FILE",
        help="TLS: the client certificate's key",
    )
    g.add_argument(
        "--token-file",
        default=default(None),
        metavar="FILE",
        help="send the bearer token in FILE (clients/NAME.token of `caplab certs`)",
    )
    return parent


def add_kv(sub: Any) -> None:
    """Register `caplab kv` on the subparsers object of `caplab`."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "kv",
        help="talk to a cluster (put, get, delete, cas, incr, status)",
        description="Talk to a caplab cluster (either store) through its gRPC interface.",
        epilog=KV_EPILOG,
        formatter_class=raw,
        parents=[_common_flags(after_op=False)],
    )
    after = [_common_flags(after_op=True)]
    ops = p.add_subparsers(dest="op", required=True, metavar="OP", parser_class=_OpParser)

    def op(name: str) -> argparse.ArgumentParser:
        short, long = OPS_HELP[name]
        o: argparse.ArgumentParser = ops.add_parser(
            name,
            help=short,
            description=long,
            epilog=EXIT_CODES,
            formatter_class=raw,
            parents=after,
        )
        return o

    o = op("put")
    o.add_argument("key")
    o.add_argument(
        "value",
        nargs="?",
        help="the value; '-' reads it from standard input (the bytes as they are)",
    )
    o.add_argument("--file", metavar="PATH", help="read the value from PATH (instead of VALUE)")
    o = op("get")
    o.add_argument("key")
    o.add_argument(
        "--local", action="store_true", help="answer from the contacted node (may be stale)"
    )
    o.add_argument(
        "--linearizable",
        action="store_true",
        help="insist on a linearizable read (raft; gossip refuses it)",
    )
    o.add_argument(
        "--consistency",
        choices=sorted(LEVELS),
        metavar="LEVEL",
        help="the read guarantee (README: 'The consistency spectrum'): "
        + ", ".join(sorted(LEVELS)),
    )
    o.add_argument(
        "--max-staleness-ms",
        type=int,
        default=0,
        metavar="MS",
        help="the bound of --consistency bounded-staleness",
    )
    o = op("delete")
    o.add_argument("key")
    o = op("cas")
    o.add_argument("key")
    o.add_argument("expected", help="the value KEY must hold ('-' with --absent)")
    o.add_argument("new", help="the value to write")
    o.add_argument("--absent", action="store_true", help="expect the key to be absent")
    o = op("incr")
    o.add_argument("key")
    o.add_argument("delta", nargs="?", type=int, default=1, help="an integer (default: 1)")
    op("status")
    p.set_defaults(func=cmd_kv)


# -- running it ---------------------------------------------------------------------
def endpoints(args: argparse.Namespace) -> list[str]:
    """--endpoint (before and after OP), else $CAPLAB_ENDPOINTS, else $CAPLAB_ENDPOINT,
    else the default."""
    given = [*(args.endpoint or ()), *getattr(args, "endpoint_after_op", ())]
    if given:
        return given
    for name in (ENV_ENDPOINTS, ENV_ENDPOINT_ALIAS):
        env = os.environ.get(name, "").strip()
        if env:
            try:
                eps = [hostport(e.strip()) for e in env.split(",") if e.strip()]
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"${name}: {e}") from None
            if eps:
                return eps
    return [DEFAULT_ENDPOINT]


def _read(path: str, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else _read_file(path)
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path}: {e.strerror}") from None


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_value(path: str, what: str) -> bytes:
    """A value from PATH ('-': standard input), at most 1 MiB: a larger one is refused
    before it is read (a regular file) or after reading one byte more than the limit (a
    pipe), never held in memory whole."""
    from caplab.validation import MAX_VALUE_BYTES

    def too_big(size: str) -> UsageError:
        return UsageError(
            f"{what}: the value is {size} bytes; the limit is {MAX_VALUE_BYTES} bytes (1 MiB); "
            "nothing was sent"
        )

    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_VALUE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # 0 for a pipe: read, with the limit
                if size > MAX_VALUE_BYTES:
                    raise too_big(str(size))
                data = f.read(MAX_VALUE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_VALUE_BYTES:
        raise too_big(f"more than {MAX_VALUE_BYTES}")
    return data


def _put_value(args: argparse.Namespace) -> bytes:
    if args.file is not None and args.value is not None:
        raise UsageError("put: give VALUE or --file PATH, not both")
    if args.file is not None:
        return _read_value(args.file, "--file")
    if args.value is None:
        raise UsageError("put: no value: give VALUE, '-' (standard input) or --file PATH")
    if args.value == "-":
        return _read_value("-", "put: standard input")
    value: bytes = args.value.encode("utf-8", "surrogateescape")
    return value


def _client_security(args: argparse.Namespace) -> tuple[Any, str | None]:
    """(TLS channel credentials or None, bearer token or None) from the flags."""
    if (args.cert_file is None) != (args.key_file is None):
        raise UsageError("--cert and --key go together")
    if args.cert_file is not None and args.ca is None:
        raise UsageError("--cert needs --ca (certificates travel over TLS)")
    creds = None
    if args.ca is not None:
        import grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(args.ca, "--ca"),
            private_key=_read(args.key_file, "--key") if args.key_file else None,
            certificate_chain=_read(args.cert_file, "--cert") if args.cert_file else None,
        )
    token = _read(args.token_file, "--token-file").decode().strip() if args.token_file else None
    return creds, token


class Outcome:
    """What a kv operation prints: ``doc`` with --json, else ``text``."""

    __slots__ = ("doc", "text")

    def __init__(self, doc: dict[str, Any], text: str) -> None:
        self.doc = doc
        self.text = text


# --consistency names -> kv.proto Consistency values (aliases as in the proto)
LEVELS = {
    "strong": 1,
    "linearizable": 1,
    "bounded-staleness": 3,
    "session": 4,
    "consistent-prefix": 5,
    "monotonic-reads": 6,
    "read-my-writes": 7,
    "eventual": 2,
    "local": 2,
}


def _header(h: kv_pb2.ResponseHeader) -> dict[str, Any]:
    out: dict[str, Any] = {"node": h.node_id}
    if h.term or h.index:
        out.update(term=h.term, index=h.index)
    if h.HasField("hlc"):
        out["hlc"] = f"{h.hlc.wall_ms}.{h.hlc.logical}@{h.hlc.node_id}"
    if h.stale_possible:
        out["stale_possible"] = True
    if h.forwarded_by:
        out["forwarded_by"] = h.forwarded_by
    if h.session_token:
        out["session_token"] = h.session_token.hex()
    return out


def _decode(v: bytes) -> str:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + v.hex()


def _encoded(v: bytes, name: str, encoding: str = "encoding") -> dict[str, str]:
    """A value for --json, unambiguously: ``{name: text, encoding: "utf-8"}`` when it is
    UTF-8, else ``{name + "_hex": hex digits, encoding: "hex"}``."""
    try:
        return {name: v.decode("utf-8"), encoding: "utf-8"}
    except UnicodeDecodeError:
        return {f"{name}_hex": v.hex(), encoding: "hex"}


async def _run_op(c: KVClient, args: argparse.Namespace, value: bytes | None) -> Outcome:
    from caplab.v1 import kv_pb2

    op, key = args.op, str(getattr(args, "key", ""))
    if op == "put":
        assert value is not None
        r = await c.put(key, value)
        return Outcome({"ok": True, "op": op, "key": key, **_header(r.header)}, "ok")
    if op == "get":
        level = (
            LEVELS[args.consistency]
            if args.consistency
            else kv_pb2.CONSISTENCY_LOCAL
            if args.local
            else kv_pb2.CONSISTENCY_LINEARIZABLE
            if args.linearizable
            else kv_pb2.CONSISTENCY_DEFAULT
        )
        g = await c.get(key, level, max_staleness_ms=args.max_staleness_ms)
        doc: dict[str, Any] = {"ok": True, "op": op, "key": key, "found": g.found}
        if isinstance(g.value, bytes):
            doc |= {"type": "register", **_encoded(g.value, "value")}
            shown = _decode(g.value)
        else:
            doc |= {"type": "counter", "value": g.value} if g.found else {"value": None}
            shown = str(g.value)
        return Outcome({**doc, **_header(g.header)}, shown if g.found else "(absent)")
    if op == "delete":
        d = await c.delete(key)
        doc = {"ok": True, "op": op, "key": key, "existed": d.existed}
        return Outcome(
            {**doc, **_header(d.header)}, "deleted" if d.existed else "deleted (was absent)"
        )
    if op == "cas":
        expected = None if args.absent else args.expected.encode("utf-8", "surrogateescape")
        s = await c.cas(key, expected, args.new.encode("utf-8", "surrogateescape"))
        current = _decode(s.current) if s.found else None
        doc = {"ok": True, "op": op, "key": key, "swapped": s.swapped}
        doc |= _encoded(s.current, "current", "current_encoding") if s.found else {"current": None}
        text = "swapped" if s.swapped else f"not swapped; current: {current}"
        return Outcome({**doc, **_header(s.header)}, text)
    if op == "incr":
        i = await c.increment(key, args.delta)
        doc = {"ok": True, "op": op, "key": key, "value": i.value}
        return Outcome({**doc, **_header(i.header)}, str(i.value))
    st = await c.status()
    if not args.json:
        return Outcome({}, status_table(st))
    from google.protobuf.json_format import MessageToDict

    return Outcome(
        {"ok": True, "op": op, "status": MessageToDict(st, preserving_proto_field_name=True)}, ""
    )


async def _kv(args: argparse.Namespace, value: bytes | None) -> Outcome:
    from caplab.client import KVClient

    creds, token = _client_security(args)
    async with KVClient(
        args.endpoint,
        timeout=args.timeout,
        retries=args.retries,
        credentials=creds,
        token=token,
        session=args.session_token is not None,
    ) as c:
        c.session_token = bytes.fromhex(args.session_token or "")
        return await _run_op(c, args, value)


def cmd_kv(args: argparse.Namespace) -> int:
    import asyncio
    import json

    args.endpoint = endpoints(args)
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.retries < 0:
        raise UsageError("--retries cannot be negative")
    if args.op == "get" and sum(map(bool, (args.local, args.linearizable, args.consistency))) > 1:
        raise UsageError("--local, --linearizable and --consistency exclude each other")
    if args.op == "get" and (args.max_staleness_ms < 0 or args.max_staleness_ms >= 2**32):
        raise UsageError("--max-staleness-ms must be between 0 and 2**32 - 1")
    if args.session_token is not None:
        try:
            bytes.fromhex(args.session_token)
        except ValueError:
            raise UsageError("--session-token takes the hex digits a --json answer gave") from None
    try:
        getattr(args, "key", "").encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("KEY is not valid UTF-8 (keys are UTF-8 text)") from None
    value = _put_value(args) if args.op == "put" else None

    from caplab import errors

    try:
        outcome = asyncio.run(_kv(args, value))
    except KeyboardInterrupt:
        # asyncio.run cancelled the call: a mutation may have reached the store already
        print(f"caplab: {interrupted_line(args.op)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors.StoreError as e:
        if args.json:
            doc = {
                "ok": False,
                "op": args.op,
                "code": e.code.name,
                "definite": e.definite,
                "error": e.message,
            }
            print(json.dumps(doc))
        else:
            print(f"caplab: {failure_line(e, args.op, args.endpoint)}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(outcome.doc, sort_keys=True) if args.json else outcome.text)
    return EXIT_OK


def interrupted_line(op: str) -> str:
    """What Ctrl-C during a call means: for a mutation, that nobody knows whether it was
    applied."""
    if op in ("get", "status"):
        return "interrupted"
    return "interrupted: outcome unknown (the request may have been applied)"


def failure_line(e: Any, op: str, eps: list[str]) -> str:
    """One line saying whether the failed operation can have taken effect."""
    from caplab import errors

    code = e.code.name
    if isinstance(e, errors.TransportError):
        where = ", ".join(eps)
        return (
            f"not applied ({code}): could not connect to {where} (is a node listening "
            f"there?): {e.message}"
        )
    if e.definite:
        return f"refused, not applied ({code}): {e.message}"
    if op in ("get", "status"):
        return f"failed ({code}): {e.message}"
    return f"outcome unknown ({code}): {e.message}; it may have been applied"


# -- status -------------------------------------------------------------------------
def _ago(unix_ms: int, now_ms: int) -> str:
    if not unix_ms:
        return "never"
    return f"{max(0, now_ms - unix_ms) / 1000:.1f} s ago"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def status_table(st: kv_pb2.StatusResponse) -> str:
    """A StatusResponse for people: one field a line, then the members as a table."""
    import time

    from caplab.v1 import kv_pb2

    raft = st.store == kv_pb2.STORE_KIND_RAFT
    gossip = st.store == kv_pb2.STORE_KIND_GOSSIP
    store = "raft" if raft else "gossip" if gossip else "?"
    lines: list[list[str]] = [
        ["node", st.node_id],
        ["store", store],
        ["address", st.address or "-"],
        ["role", st.role or "-"],
    ]
    if raft:
        # leader_address is where this node reaches the leader: the leader's own client
        # address when it is this node, else the --peer address of it, its peer listener
        # (members only, mutual TLS): not where a client connects, so labelled as such.
        leader = st.leader_id or "(none known)"
        if st.leader_id and st.leader_id == st.node_id:
            leader += " (this node)"
        elif st.leader_id and st.leader_address:
            leader += f" (peer address {st.leader_address})"
        lines += [
            ["term", str(st.term)],
            ["leader", leader],
            ["commit", str(st.commit_index)],
            ["applied", str(st.applied_index)],
            ["first index", str(st.first_index)],
        ]
    if st.HasField("hlc"):
        lines.append(["hlc", f"{st.hlc.wall_ms}.{st.hlc.logical}@{st.hlc.node_id}"])
    lines += [
        ["keys", str(st.keys)],
        ["state digest", st.state_digest.hex()[:16] or "-"],
        ["clock skew", f"{st.clock_skew_ms} ms"],
        ["version", st.version or "-"],
    ]
    out = [f"{k:<13} {v}" for k, v in lines]
    n = len(st.members)
    out.append(f"members       {n or 'none'} besides this node")
    if st.members:
        state_names = {
            kv_pb2.MEMBER_STATE_ALIVE: "alive",
            kv_pb2.MEMBER_STATE_SUSPECT: "suspect",
            kv_pb2.MEMBER_STATE_DEAD: "dead",
        }
        now_ms = int(time.time() * 1000)
        head = ["NODE", "PEER ADDRESS", "STATE"]  # their --peer addresses, not clients
        if raft:
            head.append("MATCH INDEX")
        if gossip:
            head += ["INCARNATION", "LAST SYNC"]
        rows = [head]
        for m in sorted(st.members, key=lambda m: m.node_id):
            row = [m.node_id, m.address or "-", state_names.get(m.state, "?")]
            if raft:
                row.append(str(m.match_index) if st.role == "leader" else "-")
            if gossip:
                row += [str(m.incarnation), _ago(m.last_sync_unix_ms, now_ms)]
            rows.append(row)
        out += _table(rows)
    nonzero = sorted((k, v) for k, v in st.counters.items() if v)
    if st.counters:
        zero = len(st.counters) - len(nonzero)
        out.append(f"counters      {len(nonzero)} non-zero ({zero} zero; --json lists all)")
        out += _table([[k, str(v)] for k, v in nonzero]) if nonzero else []
    return "\n".join(out)
