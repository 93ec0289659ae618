"""Scenario files: what to run, for how long, and which faults when.

A scenario is a YAML mapping (unknown fields are refused, with file and line)::

    name: majority-minority          # required
    description: ...                 # free text
    store: both                      # raft | gossip | both (default both)
    nodes: 5                         # 1..15 (default 5)
    workload: both                   # register | counter | both (default both)
    clients_per_node: 2              # closed-loop clients pinned to each node (default 2)
    rate: 100                        # target ops/s per store, 0 = as fast as possible (default 0)
    op_timeout: 1s                   # deadline of every operation (default 1s)
    duration: 35s                    # required; the workload runs this long
    keys: 3                          # register keys and counter keys (default 3 each)
    delete_fraction: 0.15            # share of register operations that delete the key
                                     # (0 .. 0.5, default 0.15; reads are half of them)
    conflict_keys: 4                 # registers lww0.. written from both sides of a
                                     # partition, only while one is in force, so that
                                     # last-writer-wins decides them (0 .. 100, default 0)
    read_levels: [strong, session, eventual]  # the consistency spectrum: each level gets
                                     # clients_per_node clients on every node, reading at
                                     # that guarantee (harness.workload.LEVELS; default:
                                     # none, reads at the store's default, 1 in 5 LOCAL)
    roam: 0.4                        # share of each level's clients that move to a random
                                     # node before every operation (0 .. 1, default 0)
    max_staleness: 1s                # bounded_staleness reads' bound (default 1s)
    own_keys: true                   # each client writes only its own register w<n> and
                                     # reads it or another client's (default false: the
                                     # shared r0.., `keys` of them)
    client_path: pipelined           # unary | pipelined: how the workload's clients send
                                     # their operations (unary RPCs, or KV.Pipeline
                                     # streams; default unary)
    seed: 1                          # randomness of shapes, targets, workloads (default 0)
    partition_mode: drop             # drop | reject: how partitions cut links (default drop)
    converge_timeout: 10s            # after the run: wait this long for replicas to agree
    tombstone_timeout: 30s           # gossip, after the final reads: wait this long for
                                     # every node to collect its tombstones (default 0s:
                                     # do not wait, only report the counts)
    node_options:                    # `--set NAME=VALUE` for the nodes of one store
      gossip: {tombstone_min_age_ms: 2000}
    faults:
      - at: 10s
        partition: majority-minority # groups | majority-minority | random-halves | isolate |
                                     # isolate-leader | bridge | majorities-ring
      - at: 25s
        heal: true
      - at: 5s                       # `for` undoes the fault later (partition -> heal,
        for: 3s                      #  kill -> restart, pause -> resume, skew -> 0)
        kill: leader                 # node id | leader | minority | majority | random | all
      - every: 5s                    # repeating: from `from` (default 0s) until `until`
        for: 2s                      # (default: duration)
        from: 5s
        until: 30s
        partition: random-halves

Partition entries may add ``groups: [[n1, n2], [n3, n4, n5]]`` (shape ``groups``), ``target``
(shape ``isolate``), ``mode: drop|reject|delay`` and, for delay, ``delay: 200ms`` and
``jitter: 50ms``. ``restart`` takes a target or ``killed`` (``restart: true`` = killed),
``resume`` a target or ``paused``; ``clock-skew: n1`` needs ``skew: 5s`` (may be negative;
``0s`` resets). Durations are numbers with a unit: ``500ms``, ``10s``, ``1m``.

:func:`load_scenario` parses and validates a file and expands repeating entries into one
sorted timeline of :class:`Fault` actions. Errors are :class:`ScenarioError` with a message
``FILE:LINE: what is wrong; allowed: ...``.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from harness.nemesis import SHAPES, make_partition
from harness.workload import LEVELS

T = TypeVar("T")

STORES = ("raft", "gossip", "both")
WORKLOADS = ("register", "counter", "both")
CLIENT_PATHS = ("unary", "pipelined")
ACTIONS = ("partition", "heal", "kill", "restart", "pause", "resume", "clock-skew")
MODES = ("drop", "reject", "delay")
TOP_FIELDS = (
    "name",
    "description",
    "store",
    "nodes",
    "workload",
    "clients_per_node",
    "rate",
    "op_timeout",
    "duration",
    "keys",
    "seed",
    "partition_mode",
    "converge_timeout",
    "delete_fraction",
    "conflict_keys",
    "tombstone_timeout",
    "node_options",
    "read_levels",
    "roam",
    "max_staleness",
    "own_keys",
    "client_path",
    "faults",
)
FAULT_FIELDS = (
    "at",
    "every",
    "for",
    "from",
    "until",
    *ACTIONS,
    "groups",
    "target",
    "mode",
    "delay",
    "jitter",
    "skew",
)
GENERIC_TARGETS = ("leader", "minority", "majority", "random", "all")
UNDO = {"partition": "heal", "kill": "restart", "pause": "resume", "clock-skew": "clock-skew"}
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)$")
DEFAULT_DELETE_FRACTION = 0.15  # = harness.workload.DEFAULT_DELETE_FRACTION
MAX_DELETE_FRACTION = 0.5


class ScenarioError(ValueError):
    """A scenario file is invalid; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One action of the expanded timeline."""

    at: float  # seconds since the workload started
    action: str  # one of ACTIONS
    shape: str | None = None  # partition
    groups: tuple[tuple[str, ...], ...] | None = None  # partition groups
    target: str | None = None  # kill/restart/pause/resume/clock-skew/isolate
    mode: str | None = None  # partition: drop|reject|delay (None: the scenario's default)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    skew_ms: int = 0
    line: int = 0  # line of the entry in the scenario file

    def describe(self) -> str:
        parts = [f"{self.at:g}s {self.action}"]
        if self.shape:
            parts.append(self.shape)
        if self.target:
            parts.append(self.target)
        if self.action == "clock-skew":
            parts.append(f"{self.skew_ms}ms")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    duration: float  # seconds
    description: str = ""
    path: str = "<scenario>"
    store: str = "both"
    nodes: int = 5
    workload: str = "both"
    clients_per_node: int = 2
    rate: float = 0.0  # ops/s per store; 0 = unlimited
    op_timeout: float = 1.0
    keys: int = 3
    seed: int = 0
    partition_mode: str = "drop"
    converge_timeout: float = 10.0
    delete_fraction: float = DEFAULT_DELETE_FRACTION
    conflict_keys: int = 0  # registers lww0.. written from both sides during partitions
    tombstone_timeout: float = 0.0  # gossip: wait for tombstone collection (0: do not)
    node_options: tuple[tuple[str, str, int], ...] = ()  # (store, name, value) for --set
    read_levels: tuple[str, ...] = ()  # harness.workload.LEVELS names; () = mixed reads
    roam: float = 0.0  # share of each level's clients that roam between nodes
    max_staleness: float = 1.0  # seconds, bounded_staleness reads
    own_keys: bool = False  # each client writes its own register (harness.workload)
    client_path: str = "unary"  # unary | pipelined (KV.Pipeline)
    faults: tuple[Fault, ...] = ()

    @property
    def stores(self) -> tuple[str, ...]:
        return ("raft", "gossip") if self.store == "both" else (self.store,)

    @property
    def node_ids(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    def options_for(self, store: str) -> dict[str, int]:
        """The ``--set`` options of ``store``'s nodes (name -> value)."""
        return {name: value for s, name, value in self.node_options if s == store}

    def with_duration(self, duration: float) -> Scenario:
        """Override the duration; faults after it are dropped."""
        return dataclasses.replace(
            self, duration=duration, faults=tuple(f for f in self.faults if f.at <= duration)
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "file": self.path,
            "nodes": self.nodes,
            "workload": self.workload,
            "clients_per_node": self.clients_per_node,
            "rate": self.rate,
            "op_timeout_s": self.op_timeout,
            "duration_s": self.duration,
            "keys": self.keys,
            "delete_fraction": self.delete_fraction,
            "conflict_keys": self.conflict_keys,
            "seed": self.seed,
            "read_levels": list(self.read_levels),
            "roam": self.roam,
            "max_staleness_ms": round(self.max_staleness * 1000),
            "own_keys": self.own_keys,
            "client_path": self.client_path,
            "partition_mode": self.partition_mode,
            "tombstone_timeout_s": self.tombstone_timeout,
            "node_options": {
                store: self.options_for(store)
                for store in dict.fromkeys(s for s, _, _ in self.node_options)
            },
            "faults": [f.describe() for f in self.faults],
        }


def parse_duration(text: str) -> float:
    """``500ms`` / ``10s`` / ``1m`` / ``1h`` / ``-2s`` -> seconds (ValueError otherwise)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"expected a duration like 500ms, 10s, 1m or 1h, got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def err(self, node: Node, msg: str) -> ScenarioError:
        return ScenarioError(f"{self.path}:{node.start_mark.line + 1}: {msg}")

    def scalar(self, node: Node, what: str) -> str:
        if not isinstance(node, ScalarNode):
            raise self.err(node, f"{what} must be a single value")
        return str(node.value)

    def choice(self, node: Node, what: str, allowed: Sequence[str]) -> str:
        v = self.scalar(node, what)
        if v not in allowed:
            raise self.err(node, f"bad {what} {v!r}; allowed: {', '.join(allowed)}")
        return v

    def integer(self, node: Node, what: str, lo: int, hi: int) -> int:
        v = self.scalar(node, what)
        try:
            n = int(v)
        except ValueError:
            raise self.err(node, f"{what} must be an integer, got {v!r}") from None
        if not lo <= n <= hi:
            raise self.err(node, f"{what} must be between {lo} and {hi}, got {n}")
        return n

    def number(self, node: Node, what: str, lo: float) -> float:
        v = self.scalar(node, what)
        try:
            x = float(v)
        except ValueError:
            raise self.err(node, f"{what} must be a number, got {v!r}") from None
        if x < lo:
            raise self.err(node, f"{what} must be >= {lo:g}, got {v}")
        return x

    def fraction(self, node: Node, what: str, hi: float) -> float:
        x = self.number(node, what, 0)
        if x > hi:
            raise self.err(node, f"{what} must be between 0 and {hi:g}, got {x:g}")
        return x

    def duration(self, node: Node, what: str, *, allow_negative: bool = False) -> float:
        v = self.scalar(node, what)
        try:
            d = parse_duration(v)
        except ValueError as e:
            raise self.err(node, f"{what}: {e}") from None
        if d < 0 and not allow_negative:
            raise self.err(node, f"{what} must not be negative, got {v!r}")
        return d

    def boolean(self, node: Node, what: str) -> bool:
        v = self.scalar(node, what).lower()
        if v not in ("true", "false"):
            raise self.err(node, f"{what} must be true or false, got {v!r}")
        return v == "true"

    def boolean_true(self, node: Node, what: str) -> None:
        v = self.scalar(node, what)
        if v.lower() != "true":
            raise self.err(node, f"{what} must be true, got {v!r}")

    def mapping(
        self, node: Node, what: str, allowed: Sequence[str]
    ) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.err(node, f"{what} must be a mapping of fields")
        out: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            key = self.scalar(k, "field name")
            if key not in allowed:
                raise self.err(k, f"unknown field {key!r} in {what}; allowed: {', '.join(allowed)}")
            if key in out:
                raise self.err(k, f"field {key!r} given twice in {what}")
            out[key] = (k, v)
        return out


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    """Parse and validate scenario YAML text (see the module docstring)."""
    ctx = _Ctx(path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ScenarioError(f"{path}{line}: invalid YAML: {problem}") from None
    if root is None:
        raise ScenarioError(f"{path}:1: empty scenario; required fields: name, duration")
    top = ctx.mapping(root, "scenario", TOP_FIELDS)
    for required in ("name", "duration"):
        if required not in top:
            raise ctx.err(root, f"missing required field {required!r}")

    def get(key: str, conv: Callable[[Node], T], default: T) -> T:
        return conv(top[key][1]) if key in top else default

    name = ctx.scalar(top["name"][1], "name")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ctx.err(top["name"][1], f"name must be letters, digits, '.', '_' or '-': {name!r}")
    nodes = get("nodes", lambda n: ctx.integer(n, "nodes", 1, 15), 5)
    duration = ctx.duration(top["duration"][1], "duration")
    if duration <= 0:
        raise ctx.err(top["duration"][1], "duration must be positive")
    sc = Scenario(
        name=name,
        duration=duration,
        description=get("description", lambda n: ctx.scalar(n, "description"), ""),
        path=path,
        store=get("store", lambda n: ctx.choice(n, "store", STORES), "both"),
        nodes=nodes,
        workload=get("workload", lambda n: ctx.choice(n, "workload", WORKLOADS), "both"),
        clients_per_node=get(
            "clients_per_node", lambda n: ctx.integer(n, "clients_per_node", 1, 64), 2
        ),
        rate=get("rate", lambda n: ctx.number(n, "rate", 0), 0.0),
        op_timeout=get("op_timeout", lambda n: ctx.duration(n, "op_timeout"), 1.0),
        keys=get("keys", lambda n: ctx.integer(n, "keys", 1, 1000), 3),
        seed=get("seed", lambda n: ctx.integer(n, "seed", 0, 2**63 - 1), 0),
        partition_mode=get(
            "partition_mode", lambda n: ctx.choice(n, "partition_mode", ("drop", "reject")), "drop"
        ),
        converge_timeout=get(
            "converge_timeout", lambda n: ctx.duration(n, "converge_timeout"), 10.0
        ),
        delete_fraction=get(
            "delete_fraction",
            lambda n: ctx.fraction(n, "delete_fraction", MAX_DELETE_FRACTION),
            DEFAULT_DELETE_FRACTION,
        ),
        conflict_keys=get("conflict_keys", lambda n: ctx.integer(n, "conflict_keys", 0, 100), 0),
        tombstone_timeout=get(
            "tombstone_timeout", lambda n: ctx.duration(n, "tombstone_timeout"), 0.0
        ),
        node_options=get("node_options", lambda n: _parse_node_options(ctx, n), ()),
        read_levels=get("read_levels", lambda n: _parse_levels(ctx, n), ()),
        roam=get("roam", lambda n: ctx.fraction(n, "roam", 1.0), 0.0),
        max_staleness=get("max_staleness", lambda n: ctx.duration(n, "max_staleness"), 1.0),
        own_keys=get("own_keys", lambda n: ctx.boolean(n, "own_keys"), False),
        client_path=get(
            "client_path", lambda n: ctx.choice(n, "client_path", CLIENT_PATHS), "unary"
        ),
    )
    if "max_staleness" in top and not 0.001 <= sc.max_staleness <= 86_400:
        raise ctx.err(top["max_staleness"][1], "max_staleness must be between 1ms and 24h")
    if sc.op_timeout <= 0:
        raise ctx.err(top["op_timeout"][1], "op_timeout must be positive")
    faults: list[Fault] = []
    if "faults" in top:
        fnode = top["faults"][1]
        if isinstance(fnode, ScalarNode) and fnode.value in ("", "null", "~"):
            pass
        elif not isinstance(fnode, SequenceNode):
            raise ctx.err(fnode, "faults must be a list of entries")
        else:
            for entry in fnode.value:
                faults.extend(_parse_fault(ctx, entry, sc))
    faults.sort(key=lambda f: (f.at, f.line))
    return dataclasses.replace(sc, faults=tuple(faults))


def _parse_fault(ctx: _Ctx, entry: Node, sc: Scenario) -> list[Fault]:
    fields = ctx.mapping(entry, "fault", FAULT_FIELDS)
    line = entry.start_mark.line + 1
    actions = [a for a in ACTIONS if a in fields]
    if len(actions) != 1:
        what = "no action" if not actions else f"several actions ({', '.join(actions)})"
        raise ctx.err(
            entry, f"a fault needs exactly one action, got {what}; allowed: " + ", ".join(ACTIONS)
        )
    action = actions[0]
    anode = fields[action][1]
    node_ids = sc.node_ids

    def target(node: Node, what: str, extra: Sequence[str]) -> str:
        allowed = [*node_ids, *GENERIC_TARGETS, *extra]
        return ctx.choice(node, what, allowed)

    def only(allowed_with: Sequence[str]) -> None:
        for k, (knode, _) in fields.items():
            if k in ("at", "every", "for", "from", "until", action):
                continue
            if k not in allowed_with:
                raise ctx.err(knode, f"field {k!r} does not apply to {action}")

    shape: str | None = None
    groups: tuple[tuple[str, ...], ...] | None = None
    tgt: str | None = None
    mode: str | None = None
    delay_ms = jitter_ms = 0.0
    skew_ms = 0
    if action == "partition":
        only(("groups", "target", "mode", "delay", "jitter"))
        shape = ctx.choice(anode, "partition shape", SHAPES)
        if "groups" in fields:
            if shape != "groups":
                raise ctx.err(fields["groups"][0], "groups only apply to 'partition: groups'")
            groups = _parse_groups(ctx, fields["groups"][1], node_ids)
        elif shape == "groups":
            raise ctx.err(anode, "partition: groups needs a groups field, e.g. [[n1, n2], [n3]]")
        if "target" in fields:
            if shape != "isolate":
                raise ctx.err(fields["target"][0], "target only applies to 'partition: isolate'")
            tgt = target(fields["target"][1], "target", ())
        if "mode" in fields:
            mode = ctx.choice(fields["mode"][1], "mode", MODES)
        for k in ("delay", "jitter"):
            if k in fields and mode != "delay":
                raise ctx.err(fields[k][0], f"{k} only applies with mode: delay")
        if mode == "delay":
            if "delay" not in fields:
                raise ctx.err(entry, "mode: delay needs delay (e.g. delay: 200ms)")
            delay_ms = ctx.duration(fields["delay"][1], "delay") * 1000
            if "jitter" in fields:
                jitter_ms = ctx.duration(fields["jitter"][1], "jitter") * 1000
        try:
            make_partition(shape, node_ids, random.Random(0), groups=groups, node=node_ids[0])
        except ValueError as e:
            raise ctx.err(anode, f"{e} (the scenario has {sc.nodes} nodes)") from None
    elif action == "heal":
        only(())
        ctx.boolean_true(anode, "heal")
    elif action in ("kill", "pause"):
        only(())
        tgt = target(anode, f"{action} target", ())
    elif action in ("restart", "resume"):
        only(())
        default = "killed" if action == "restart" else "paused"
        v = ctx.scalar(anode, f"{action} target")
        tgt = default if v.lower() == "true" else target(anode, f"{action} target", (default,))
    else:  # clock-skew
        only(("skew",))
        tgt = target(anode, "clock-skew target", ("skewed",))
        if "skew" not in fields:
            raise ctx.err(entry, "clock-skew needs skew (e.g. skew: 5s, or -2s, 0s to reset)")
        skew = ctx.duration(fields["skew"][1], "skew", allow_negative=True)
        if abs(skew) > 86400:
            raise ctx.err(fields["skew"][1], "skew must be within +-1 day")
        skew_ms = round(skew * 1000)

    base = Fault(0.0, action, shape, groups, tgt, mode, delay_ms, jitter_ms, skew_ms, line)
    has_at, has_every = "at" in fields, "every" in fields
    if has_at == has_every:
        raise ctx.err(
            entry,
            "a fault needs either at (once) or every (repeating), not "
            + ("both" if has_at else "neither"),
        )
    hold: float | None = None
    if "for" in fields:
        if action not in UNDO:
            raise ctx.err(
                fields["for"][0], f"for does not apply to {action}; allowed with: {', '.join(UNDO)}"
            )
        hold = ctx.duration(fields["for"][1], "for")
        if hold <= 0:
            raise ctx.err(fields["for"][1], "for must be positive")
    for k in ("from", "until"):
        if k in fields and not has_every:
            raise ctx.err(fields[k][0], f"{k} only applies with every")

    def check_time(node: Node, t: float, what: str) -> None:
        if t > sc.duration:
            raise ctx.err(node, f"{what} {t:g}s is after the end of the run ({sc.duration:g}s)")

    starts: list[float] = []
    if has_at:
        at = ctx.duration(fields["at"][1], "at")
        check_time(fields["at"][1], at, "at")
        starts = [at]
    else:
        every = ctx.duration(fields["every"][1], "every")
        if every <= 0:
            raise ctx.err(fields["every"][1], "every must be positive")
        start = ctx.duration(fields["from"][1], "from") if "from" in fields else 0.0
        until = ctx.duration(fields["until"][1], "until") if "until" in fields else sc.duration
        if "until" in fields:
            check_time(fields["until"][1], until, "until")
        if start >= until:
            node = fields["from"][1] if "from" in fields else fields["every"][1]
            raise ctx.err(node, f"from ({start:g}s) must be before until ({until:g}s)")
        if hold is not None and hold >= every:
            raise ctx.err(
                fields["for"][1], f"for ({hold:g}s) must be shorter than every ({every:g}s)"
            )
        t = start
        while t < until - 1e-9:
            starts.append(round(t, 6))
            t += every
    out: list[Fault] = []
    for t in starts:
        out.append(dataclasses.replace(base, at=t))
        if hold is not None:
            end = min(t + hold, sc.duration)
            out.append(_undo(base, end))
    return out


def _undo(f: Fault, at: float) -> Fault:
    if f.action == "partition":
        return Fault(at, "heal", line=f.line)
    if f.action == "kill":
        return Fault(at, "restart", target="killed", line=f.line)
    if f.action == "pause":
        return Fault(at, "resume", target="paused", line=f.line)
    return Fault(at, "clock-skew", target="skewed", skew_ms=0, line=f.line)


def _parse_levels(ctx: _Ctx, node: Node) -> tuple[str, ...]:
    if not isinstance(node, SequenceNode):
        raise ctx.err(node, f"read_levels must be a list; allowed: {', '.join(LEVELS)}")
    out: list[str] = []
    for item in node.value:
        level = ctx.choice(item, "read level", tuple(LEVELS))
        if level in out:
            raise ctx.err(item, f"read level {level!r} listed twice")
        out.append(level)
    return tuple(out)


def _parse_node_options(ctx: _Ctx, node: Node) -> tuple[tuple[str, str, int], ...]:
    """``{store: {NAME: integer}}``, checked by the store's own option parser (the one
    ``caplab node --set`` uses), so a bad option is refused here rather than by a node."""
    from caplab import errors

    out: list[tuple[str, str, int]] = []
    for store, (knode, vnode) in ctx.mapping(node, "node_options", STORES[:2]).items():
        parser = _options_class(store)
        names = [f.name for f in dataclasses.fields(parser)]
        opts = ctx.mapping(vnode, f"node_options of {store}", names)
        texts = {name: ctx.scalar(v, f"{store} option {name}") for name, (_, v) in opts.items()}
        try:
            parser.parse(texts)
        except errors.StoreError as e:
            raise ctx.err(knode, e.message) from None
        out += [(store, name, int(text)) for name, text in texts.items()]
    return tuple(out)


def _options_class(store: str) -> Any:
    """The dataclass of ``store``'s node options (``GossipOptions`` / ``RaftOptions``)."""
    import importlib

    module = importlib.import_module(f"{store}.node")
    return module.GossipOptions if store == "gossip" else module.RaftOptions


def _parse_groups(ctx: _Ctx, node: Node, node_ids: list[str]) -> tuple[tuple[str, ...], ...]:
    if not isinstance(node, SequenceNode) or not node.value:
        raise ctx.err(node, "groups must be a list of lists of node ids, e.g. [[n1, n2], [n3]]")
    seen: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for g in node.value:
        if not isinstance(g, SequenceNode) or not g.value:
            raise ctx.err(g, "each group must be a non-empty list of node ids")
        members: list[str] = []
        for m in g.value:
            n = ctx.choice(m, "node id", node_ids)
            if n in seen:
                raise ctx.err(m, f"node {n!r} is in more than one group")
            seen.add(n)
            members.append(n)
        groups.append(tuple(members))
    return tuple(groups)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file (ScenarioError naming file:line on any problem)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read scenario: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{p}: not UTF-8 text: {e.reason}") from None
    return parse_scenario(text, str(p))
