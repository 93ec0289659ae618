"""Only members speak as members: the review's attacks on the peer path, on real nodes.

Each attack of issue 14 is sent twice: as an outsider (no certificate, or a client
certificate of the same CA, or to the client port) and as the wrong member (n2's
certificate, the message claiming to come from n3). Every attempt is refused, and the
state it aimed at is unchanged.
"""

from __future__ import annotations

import asyncio
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from caplab import errors
from caplab.client import KVClient
from caplab.gossip.v1 import gossip_pb2 as gpb
from caplab.gossip.v1 import gossip_pb2_grpc as gpb_grpc
from caplab.peer import PEER_CHANNEL_OPTIONS
from caplab.pipeline_client import Pipeline
from caplab.raft.v1 import raft_pb2 as rpb
from caplab.raft.v1 import raft_pb2_grpc as rpb_grpc
from caplab.security import channel_credentials, load_client_tls, load_node_tls
from caplab.v1 import kv_pb2, kv_pb2_grpc
from harness.cluster import LocalCluster
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REFUSED = {
    grpc.StatusCode.UNAVAILABLE,  # the TLS handshake failed (no or foreign certificate)
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,  # a certificate of the CA, but not a member's
    grpc.StatusCode.UNIMPLEMENTED,  # peer services are not served on the client port
}
YEAR_MS = 365 * 24 * 3600 * 1000


async def _cluster(store: str, root: Path) -> LocalCluster:
    cluster = LocalCluster(store, 3, root, enable_admin=True)
    cluster.start()
    await cluster.wait_ready()
    async with KVClient(list(cluster.endpoints.values()), timeout=5.0) as c:

        async def ready() -> bool:
            try:
                await c.put("victim", b"original")
                await c.increment("ctr", 5)
                return True
            except Exception:
                return False

        await eventually(ready, 30)
    return cluster


def _outsider_channels(cluster: LocalCluster, node: str) -> dict[str, grpc.aio.Channel]:
    """Every way an outsider can dial ``node``'s peer services."""
    peer = f"127.0.0.1:{cluster.peer_ports[node]}"
    ca = load_node_tls(cluster.certs, node).ca
    client = load_client_tls(cluster.certs, "admin")  # a certificate of the CA: no member
    opts = [*PEER_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", node)]
    return {
        "plaintext to the peer port": grpc.aio.insecure_channel(peer),
        "TLS without a certificate": grpc.aio.secure_channel(
            peer, channel_credentials(ca), options=opts
        ),
        "an admin client certificate": grpc.aio.secure_channel(
            peer, channel_credentials(ca, client), options=opts
        ),
        "the client port": grpc.aio.insecure_channel(cluster.endpoints[node]),
    }


def _member_channel(cluster: LocalCluster, member: str, target: str) -> grpc.aio.Channel:
    """``member``'s certificate, dialling ``target``'s peer port."""
    tls = load_node_tls(cluster.certs, member)
    return grpc.aio.secure_channel(
        f"127.0.0.1:{cluster.peer_ports[target]}",
        channel_credentials(tls.ca, tls),
        options=[*PEER_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", target)],
    )


async def _status(cluster: LocalCluster, node: str) -> kv_pb2.StatusResponse:
    async with grpc.aio.insecure_channel(cluster.endpoints[node]) as ch:
        return await kv_pb2_grpc.ClusterStub(ch).Status(kv_pb2.StatusRequest(), timeout=5)


async def _dump(cluster: LocalCluster, node: str) -> dict[str, kv_pb2.DumpEntry]:
    async with grpc.aio.insecure_channel(cluster.endpoints[node]) as ch:
        stub = kv_pb2_grpc.ClusterStub(ch)
        return {e.key: e async for e in stub.Dump(kv_pb2.DumpRequest(), timeout=5)}


async def _stream(stub_call: Callable[..., Any], batch: Any) -> None:
    async def one() -> AsyncIterator[Any]:
        yield batch

    await stub_call(one(), timeout=5)


async def _attempt_as_outsider(
    cluster: LocalCluster, node: str, send: Callable[[grpc.aio.Channel], Any]
) -> None:
    for how, ch in _outsider_channels(cluster, node).items():
        async with ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await send(ch)
            assert err.value.code() in REFUSED, (how, err.value.code(), err.value.details())


async def _attempt_as_wrong_member(
    cluster: LocalCluster, node: str, send: Callable[[grpc.aio.Channel], Any]
) -> None:
    """n2's certificate, the message naming n3 as its sender: dropped and counted."""
    before = (await _status(cluster, node)).counters["messages_forged"]
    async with _member_channel(cluster, "n2", node) as ch:
        await send(ch)

    async def counted() -> bool:
        return (await _status(cluster, node)).counters["messages_forged"] > before

    await eventually(counted, 10)


# ---------------------------------------------------------------------------------- raft


@pytest.fixture(scope="module")
def raft_cluster() -> Any:

    root = Path(tempfile.mkdtemp(prefix="caplab-peer-auth-raft-"))
    cluster = asyncio.run(_cluster("raft", root))
    yield cluster
    cluster.close()


def _raft(term: int, to: str, sender: str = "n3", **body: Any) -> rpb.Batch:
    return rpb.Batch(messages=[rpb.RaftMessage(sender=sender, to=to, term=term, **body)])


def _put_command(key: str, value: bytes) -> bytes:
    return rpb.Command(key=key, put=value).SerializeToString()


async def _raft_view(cluster: LocalCluster) -> list[tuple[int, str, bytes]]:
    view = []
    for n in ("n1", "n2", "n3"):
        st = await _status(cluster, n)
        victim = (await _dump(cluster, n)).get("victim")
        view.append((st.term, st.leader_id, victim.value if victim else b""))
    return view


async def test_a_client_cannot_pose_as_a_forwarding_node(raft_cluster: LocalCluster) -> None:
    """With a peer listener, a request on the client listener that claims to have been
    forwarded (metadata caplab-forwarded-by) is an ordinary client request: a follower
    forwards it to its leader as any other (it refused it, as if it came from a node)."""
    cluster = raft_cluster
    leader = (await _status(cluster, "n1")).leader_id
    follower = "n1" if leader != "n1" else "n2"
    async with grpc.aio.insecure_channel(cluster.endpoints[follower]) as ch:
        resp = await kv_pb2_grpc.KVStub(ch).Put(
            kv_pb2.PutRequest(key="posed", value=b"1"),
            metadata=(("caplab-forwarded-by", "n3"),),
            timeout=5,
        )
    assert resp.header.node_id == leader and resp.header.forwarded_by == follower


async def test_a_request_forwarded_over_a_pipeline_is_never_forwarded_again(
    raft_cluster: LocalCluster,
) -> None:
    """A follower forwards over KV.Pipeline; a forwarded request that reaches a node that
    does not lead is refused there (definitely not applied), never forwarded twice."""
    cluster = raft_cluster
    leader = (await _status(cluster, "n1")).leader_id
    follower = "n1" if leader != "n1" else "n2"
    sender = next(n for n in ("n1", "n2", "n3") if n not in (leader, follower))
    async with _member_channel(cluster, sender, follower) as ch:
        pipe = Pipeline(ch, metadata=(("caplab-forwarded-by", sender),))
        try:
            with pytest.raises(errors.Unavailable) as err:
                await pipe.call("put", kv_pb2.PutRequest(key="twice", value=b"1"), 5)
        finally:
            await pipe.close()
    assert err.value.definite, err.value
    assert "twice" not in await _dump(cluster, leader)


async def test_concurrent_writes_through_a_follower_share_pipeline_messages(
    raft_cluster: LocalCluster,
) -> None:
    """64 concurrent writes through a follower take fewer than 64 pipeline messages. How
    many arrive together depends on the machine: a loaded one (CI with a simulator
    beside it) once delivered all 64 one by one, each forwarded alone; so up to five
    bursts, one of which must share messages (one message per write, as with unary
    forwarding, fails every time)."""
    cluster = raft_cluster
    leader = (await _status(cluster, "n1")).leader_id
    follower = "n1" if leader != "n1" else "n2"
    n = 64
    per_burst: list[int] = []
    for burst in range(5):
        before = (await _status(cluster, follower)).counters
        async with grpc.aio.insecure_channel(cluster.endpoints[follower]) as ch:
            stub = kv_pb2_grpc.KVStub(ch)
            answers = await asyncio.gather(
                *(
                    stub.Put(kv_pb2.PutRequest(key=f"fw/{burst}/{i}", value=b"v"), timeout=10)
                    for i in range(n)
                )
            )
        assert {a.header.node_id for a in answers} == {leader}
        assert {a.header.forwarded_by for a in answers} == {follower}
        after = (await _status(cluster, follower)).counters
        assert after["forwarded"] - before.get("forwarded", 0) == n
        per_burst.append(after["forward_messages"] - before.get("forward_messages", 0))
        assert per_burst[-1] >= 1
        dump = await _dump(cluster, leader)
        assert all(f"fw/{burst}/{i}" in dump for i in range(n))
        if per_burst[-1] < n:
            break
    assert per_burst[-1] < n, per_burst


async def test_raft_peer_attacks_are_refused(raft_cluster: LocalCluster) -> None:
    cluster = raft_cluster
    before = await _raft_view(cluster)
    st = await _status(cluster, "n1")
    term, leader = st.term, st.leader_id
    last = st.commit_index
    target = "n1" if leader != "n1" else "n2"
    wrong_target = "n1"  # n2's certificate, claiming n3 (target of the wrong-member sends)

    def attacks(to: str) -> dict[str, Callable[[grpc.aio.Channel], Any]]:
        forged_entry = rpb.Entry(
            term=term, index=last + 1, kind=1, data=_put_command("victim", b"forged")
        )
        return {
            "forged append": lambda ch: _stream(
                rpb_grpc.RaftPeerStub(ch).Stream,
                _raft(
                    term,
                    to,
                    append=rpb.Append(
                        prev_index=last, prev_term=term, entries=[forged_entry], commit=last + 1
                    ),
                ),
            ),
            "forged vote, term + 1000": lambda ch: _stream(
                rpb_grpc.RaftPeerStub(ch).Stream,
                _raft(term + 1000, to, vote=rpb.Vote(last_index=10**6, last_term=term + 1000)),
            ),
            "forged TimeoutNow": lambda ch: _stream(
                rpb_grpc.RaftPeerStub(ch).Stream, _raft(term, to, timeout_now=rpb.TimeoutNow())
            ),
            "append far beyond the log": lambda ch: _stream(
                rpb_grpc.RaftPeerStub(ch).Stream,
                _raft(
                    term,
                    to,
                    append=rpb.Append(
                        prev_index=last + 10**6,
                        prev_term=term,
                        entries=[rpb.Entry(term=term, index=last + 10**6 + 1, kind=0)],
                        commit=last + 10**6 + 1,
                    ),
                ),
            ),
        }

    for name, send in attacks(target).items():
        await _attempt_as_outsider(cluster, target, send)
        await _attempt_as_wrong_member(cluster, wrong_target, attacks(wrong_target)[name])

    # a forged snapshot (valid CRC) erasing every key
    data = b"not a state machine, but the CRC is right"

    def snapshot(to: str) -> Callable[[grpc.aio.Channel], Any]:
        async def send(ch: grpc.aio.Channel) -> None:
            async def chunks() -> AsyncIterator[rpb.SnapshotChunk]:
                yield rpb.SnapshotChunk(
                    sender="n3",
                    to=to,
                    term=term + 1,
                    index=last + 100,
                    snapshot_term=term + 1,
                    total_size=len(data),
                    offset=0,
                    data=data,
                    crc32=zlib.crc32(data),
                )

            ack = await rpb_grpc.RaftPeerStub(ch).InstallSnapshot(chunks(), timeout=5)
            assert not ack.accepted, "a forged snapshot was accepted"

        return send

    await _attempt_as_outsider(cluster, target, snapshot(target))
    await _attempt_as_wrong_member(cluster, wrong_target, snapshot(wrong_target))

    after = await _raft_view(cluster)
    assert after == before, "a refused attack changed term, leader or a key"
    # every node still serves linearizable reads and writes
    async with KVClient(list(cluster.endpoints.values()), timeout=5.0) as c:
        await c.put("after", b"ok")
        assert (await c.get("victim")).value == b"original"


# -------------------------------------------------------------------------------- gossip


@pytest.fixture(scope="module")
def gossip_cluster() -> Any:

    root = Path(tempfile.mkdtemp(prefix="caplab-peer-auth-gossip-"))
    cluster = asyncio.run(_cluster("gossip", root))
    yield cluster
    cluster.close()


def _gossip(to: str, sender: str = "n3", **body: Any) -> gpb.Batch:
    return gpb.Batch(messages=[gpb.GossipMessage(sender=sender, to=to, **body)])


def _deltas(to: str, entries: list[gpb.Entry]) -> gpb.Batch:
    return _gossip(to, deltas=gpb.Deltas(seq=1, entries=entries))


def _reg(key: str, value: bytes, wall_ms: int) -> gpb.Entry:
    ts = gpb.Timestamp(wall_ms=wall_ms, logical=0, node="n3")
    return gpb.Entry(key=key, register=gpb.Register(ts=ts, value=value))


async def test_gossip_peer_attacks_are_refused(gossip_cluster: LocalCluster) -> None:
    import time

    cluster = gossip_cluster
    target = "n1"
    future = int(time.time() * 1000) + 100 * YEAR_MS
    now = int(time.time() * 1000)

    def attacks(to: str) -> dict[str, Callable[[grpc.aio.Channel], Any]]:
        big = gpb.Counter(p={"n3/forged": 2**64 - 1})
        dead = gpb.Member(node="n3", state=gpb.MEMBER_STATE_DEAD, incarnation=2**64 - 1)
        return {
            "a delta 100 years ahead": lambda ch: _stream(
                gpb_grpc.GossipPeerStub(ch).Stream,
                _deltas(to, [_reg("victim", b"pinned", future)]),
            ),
            "a counter total of 2^64-1": lambda ch: _stream(
                gpb_grpc.GossipPeerStub(ch).Stream,
                _deltas(to, [gpb.Entry(key="ctr", counter=big)]),
            ),
            "keys the client path refuses": lambda ch: _stream(
                gpb_grpc.GossipPeerStub(ch).Stream,
                _deltas(to, [_reg(k, b"x", now) for k in ("", "a\0b", "k" * 5000)]),
            ),
            "n3 declared dead at incarnation 2^64-1": lambda ch: _stream(
                gpb_grpc.GossipPeerStub(ch).Stream,
                _gossip(to, ping=gpb.Ping(seq=1, incarnation=1, gossip_updates=[dead])),
            ),
        }

    async def converged() -> bool:
        dumps = [await _dump(cluster, n) for n in ("n1", "n2", "n3")]
        return "victim" in dumps[0] and dumps[0] == dumps[1] == dumps[2]

    await eventually(converged, 10)
    before = {n: await _dump(cluster, n) for n in ("n1", "n2", "n3")}
    for name, send in attacks(target).items():
        await _attempt_as_outsider(cluster, target, send)
        await _attempt_as_wrong_member(cluster, target, attacks(target)[name])

    after = {n: await _dump(cluster, n) for n in ("n1", "n2", "n3")}
    assert after == before, "a refused attack changed a replica"
    for n in ("n1", "n2", "n3"):
        views = {m.node_id: m.state for m in (await _status(cluster, n)).members}
        assert kv_pb2.MEMBER_STATE_DEAD not in views.values(), (n, views)
    async with KVClient([cluster.endpoints["n3"]], timeout=5.0) as c:
        await c.put("victim", b"later")
        assert (await c.get("victim")).value == b"later"


# --------------------------------------------------------------------------------- roles


async def test_client_roles_decide_what_a_client_may_call(tmp_path: Path) -> None:
    """With --client-auth: no token, UNAUTHENTICATED; a reader cannot Put; a writer
    cannot call Admin; the admin can."""
    from caplab.security import read_token

    cluster = LocalCluster("gossip", 1, tmp_path, enable_admin=True, extra_args=["--client-auth"])
    try:
        cluster.start()
        await cluster.wait_ready()
        ep = cluster.endpoints["n1"]

        def md(name: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {read_token(cluster.certs, name)}")]

        async with grpc.aio.insecure_channel(ep) as ch:
            kv, admin = kv_pb2_grpc.KVStub(ch), kv_pb2_grpc.AdminStub(ch)
            put = kv_pb2.PutRequest(key="k", value=b"v")
            skew = kv_pb2.SetClockSkewRequest(skew_ms=0)
            refusals: dict[str, tuple[Any, grpc.StatusCode]] = {
                "no token": (kv.Put(put, timeout=5), grpc.StatusCode.UNAUTHENTICATED),
                "a forged token": (
                    kv.Put(put, metadata=[("authorization", "Bearer nope")], timeout=5),
                    grpc.StatusCode.UNAUTHENTICATED,
                ),
                "reader puts": (
                    kv.Put(put, metadata=md("reader"), timeout=5),
                    grpc.StatusCode.PERMISSION_DENIED,
                ),
                "writer calls Admin": (
                    admin.SetClockSkew(skew, metadata=md("writer"), timeout=5),
                    grpc.StatusCode.PERMISSION_DENIED,
                ),
            }
            for what, (call, code) in refusals.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == code, (what, err.value.details())
            assert (await kv.Get(kv_pb2.GetRequest(key="k"), metadata=md("reader"))).found is False
            await kv.Put(put, metadata=md("writer"), timeout=5)
            assert (await kv.Get(kv_pb2.GetRequest(key="k"), metadata=md("reader"))).value == b"v"
            await admin.SetClockSkew(skew, metadata=md("admin"), timeout=5)
        # KV.Pipeline carries reads and writes: each write is checked on its own
        reader = KVClient([ep], token=read_token(cluster.certs, "reader"), pipeline=True)
        writer = KVClient([ep], token=read_token(cluster.certs, "writer"), pipeline=True)
        async with reader, writer:
            with pytest.raises(errors.StoreError) as denied:
                await reader.put("k", b"by reader")
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert denied.value.definite and "read-write" in denied.value.message
            await writer.put("k", b"by writer")
            assert (await reader.get("k")).value == b"by writer"
            async with KVClient([ep], token="nope", pipeline=True) as forged:
                with pytest.raises(errors.StoreError) as refused:
                    await forged.put("k", b"forged")
                # (UNAUTHENTICATED; or, when the first message was being written as the
                # node refused the stream, grpc's own "Internal error from Core": the
                # operation was never sent)
                assert refused.value.definite, refused.value
                assert refused.value.code in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.UNAVAILABLE,
                ), refused.value
            assert (await reader.get("k")).value == b"by writer"
    finally:
        cluster.close()


def test_caplab_kv_speaks_tls_with_a_token(tmp_path: Path) -> None:
    """`caplab kv --ca --token-file` against a node serving clients over TLS with
    --client-auth: the writer's token writes, the reader's is refused (exit 1, saying
    why), and plaintext does not get through."""
    import subprocess
    import sys

    cluster = LocalCluster("gossip", 1, tmp_path, client_tls=True, extra_args=["--client-auth"])
    try:
        cluster.start()
        asyncio.run(cluster.wait_ready())
        ep = cluster.endpoints["n1"]

        def kv(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "caplab.cli", "kv", "--endpoint", ep, "--retries", "0",
                 "--timeout", "3", *args],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        ca = str(cluster.certs / "ca.crt")
        writer = str(cluster.certs / "clients" / "writer.token")
        reader = str(cluster.certs / "clients" / "reader.token")
        ok = kv("--ca", ca, "--token-file", writer, "put", "k", "v")
        assert ok.returncode == 0, ok.stderr
        got = kv("--ca", ca, "--token-file", reader, "get", "k")
        assert got.returncode == 0 and "v" in got.stdout, got.stderr
        refused = kv("--ca", ca, "--token-file", reader, "put", "k", "w")
        assert refused.returncode == 1 and "needs role read-write" in refused.stderr
        plain = kv("--token-file", writer, "put", "k", "w")
        assert plain.returncode == 1
    finally:
        cluster.close()


def test_a_node_refuses_to_start_with_a_certificate_of_another_ca(tmp_path: Path) -> None:
    """Start-up names the file and what is wrong (exit 1), and the unsafe flag
    combinations are usage errors (exit 2) that say the way out."""
    import shutil
    import subprocess
    import sys

    from caplab.security import ensure_dev_certs

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ensure_dev_certs(ours, ["n1"])
    ensure_dev_certs(theirs, ["n1"])
    for suffix in (".crt", ".key"):
        shutil.copy(theirs / "nodes" / f"n1{suffix}", ours / "nodes" / f"n1{suffix}")

    def node(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "caplab.cli", "node", "--store", "gossip", "--id", "n1",
             "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    foreign = node("--certs", str(ours), "--peer-listen", "127.0.0.1:0")
    assert foreign.returncode == 1, foreign.stderr
    assert "was not issued by the CA" in foreign.stderr and "n1.crt" in foreign.stderr
    bare = node()
    assert bare.returncode == 2 and "--insecure" in bare.stderr
    no_peer_listener = node("--certs", str(theirs))
    assert no_peer_listener.returncode == 2 and "--peer-listen" in no_peer_listener.stderr
    network = node("--certs", str(theirs), "--peer-listen", "127.0.0.1:0", "--listen", "0.0.0.0:0")
    assert network.returncode == 2 and "--client-tls" in network.stderr
