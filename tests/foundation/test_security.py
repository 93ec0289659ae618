"""caplab.security: the development CA, start-up checks of cert files, and real mTLS calls."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from caplab import security
from caplab.security import SecurityError, TlsFiles

NODES = ("n1", "n2")


def snapshot(dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dir)): p.read_bytes() for p in dir.rglob("*") if p.is_file()}


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    dir = tmp_path / "certs"
    security.ensure_dev_certs(dir, NODES)
    return dir


@pytest.fixture
def other_certs(tmp_path: Path) -> Path:
    dir = tmp_path / "other"
    security.ensure_dev_certs(dir, NODES)
    return dir


def test_layout_idempotent_and_loadable(certs: Path) -> None:
    expected = {"ca.crt", "ca.key", "tokens.json"}
    expected |= {f"nodes/{n}.{ext}" for n in NODES for ext in ("crt", "key")}
    expected |= {
        f"clients/{c}.{e}" for c in security.DEFAULT_CLIENTS for e in ("crt", "key", "token")
    }
    before = snapshot(certs)
    assert expected <= set(before)
    for secret in ["ca.key", "nodes/n1.key", "clients/admin.key", "clients/admin.token"]:
        assert stat.S_IMODE((certs / secret).stat().st_mode) == 0o600, secret

    security.ensure_dev_certs(certs, NODES)
    assert snapshot(certs) == before

    n1 = security.load_node_tls(certs, "n1")
    assert (n1.name, n1.role) == ("n1", security.ROLE_MEMBER)
    assert n1.ca == before["ca.crt"]
    for name, role in security.DEFAULT_CLIENTS.items():
        tls = security.load_client_tls(certs, name)
        assert (tls.name, tls.role) == (name, role)
    assert security.cert_summary(n1.cert).startswith("CN=n1 OU=member, valid until ")


def test_ensure_reissues_a_cert_that_expires_soon(certs: Path) -> None:
    security.create_node_cert(certs, "n1", days=0)
    old = (certs / "nodes/n1.crt").read_bytes()
    security.ensure_dev_certs(certs, NODES)
    assert (certs / "nodes/n1.crt").read_bytes() != old
    security.load_node_tls(certs, "n1", now=dt.datetime.now(dt.UTC) + dt.timedelta(days=700))


def test_missing_file(certs: Path) -> None:
    with pytest.raises(SecurityError, match=r"nodes/n3.crt is missing: run `caplab certs --dir"):
        security.load_node_tls(certs, "n3")
    (certs / "clients/reader.key").unlink()
    with pytest.raises(SecurityError, match=r"clients/reader.key is missing"):
        security.load_client_tls(certs, "reader")


def test_unparsable(certs: Path) -> None:
    (certs / "nodes/n1.crt").write_bytes(b"not a certificate")
    with pytest.raises(SecurityError, match=r"nodes/n1.crt is not a PEM certificate"):
        security.load_node_tls(certs, "n1")


def test_expired_and_not_yet_valid(certs: Path) -> None:
    security.create_node_cert(certs, "n1", days=1)
    cert = x509.load_pem_x509_certificate((certs / "nodes/n1.crt").read_bytes())
    expired = f"nodes/n1.crt expired on {cert.not_valid_after_utc:%Y-%m-%d} (UTC)"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    with pytest.raises(SecurityError, match=re.escape(expired)):
        security.load_node_tls(certs, "n1", now=later)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    with pytest.raises(SecurityError, match=r"nodes/n1.crt is not valid before .*check the clock"):
        security.load_node_tls(certs, "n1", now=earlier)


def test_other_ca(certs: Path, other_certs: Path) -> None:
    for ext in ("crt", "key"):
        shutil.copy(other_certs / f"nodes/n1.{ext}", certs / f"nodes/n1.{ext}")
    with pytest.raises(SecurityError, match=r"was not issued by the CA in .*certs/ca.crt"):
        security.load_node_tls(certs, "n1")


def test_cn_mismatch(certs: Path) -> None:
    for ext in ("crt", "key"):
        shutil.copy(certs / f"nodes/n2.{ext}", certs / f"nodes/n1.{ext}")
    with pytest.raises(SecurityError, match=r"nodes/n1.crt is for 'n2', not 'n1'"):
        security.load_node_tls(certs, "n1")


def test_role_checks(certs: Path) -> None:
    # a client certificate is no member certificate
    for ext in ("crt", "key"):
        shutil.copy(certs / f"clients/admin.{ext}", certs / f"nodes/admin.{ext}")
    with pytest.raises(SecurityError, match=r"nodes/admin.crt has role 'admin', not 'member'"):
        security.load_node_tls(certs, "admin")
    # and a member certificate no client certificate
    for ext in ("crt", "key"):
        shutil.copy(certs / f"nodes/n1.{ext}", certs / f"clients/n1.{ext}")
    with pytest.raises(SecurityError, match=r"clients/n1.crt has unknown role 'member'"):
        security.load_client_tls(certs, "n1")
    with pytest.raises(SecurityError, match=r"unknown role 'root'"):
        security.create_client_cert(certs, "eve", "root")


def test_key_mismatch(certs: Path) -> None:
    shutil.copy(certs / "nodes/n2.key", certs / "nodes/n1.key")
    with pytest.raises(SecurityError, match=r"key .*nodes/n1.key does not match certificate"):
        security.load_node_tls(certs, "n1")


def test_bad_names_are_refused(certs: Path) -> None:
    with pytest.raises(SecurityError, match="invalid node id"):
        security.create_node_cert(certs, "../evil")


def test_tokens(certs: Path) -> None:
    path = certs / "tokens.json"
    old = security.read_token(certs, "writer")
    token = security.create_client_cert(certs, "writer", "read-write")
    assert security.read_token(certs, "writer") == token
    tokens = security.load_tokens(path)
    assert security.token_identity(tokens, token) == ("writer", "read-write")
    assert security.token_identity(tokens, old) is None  # replaced
    assert security.token_identity(tokens, token + "x") is None
    assert security.token_identity(tokens, security.read_token(certs, "admin")) == (
        "admin",
        "admin",
    )
    text = path.read_text()
    for name in security.DEFAULT_CLIENTS:
        assert security.read_token(certs, name) not in text
    assert len(json.loads(text)) == len(security.DEFAULT_CLIENTS)


def test_malformed_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("[1, 2]")
    with pytest.raises(SecurityError, match=r"tokens.json is malformed"):
        security.load_tokens(path)
    path.write_text(json.dumps({"ab" * 32: {"name": "x", "role": "god"}}))
    with pytest.raises(SecurityError, match=r"tokens.json has a bad entry for 'x'"):
        security.load_tokens(path)


@pytest.mark.parametrize(
    ("host_port", "expected"),
    [
        ("127.0.0.1:5000", True),
        ("127.0.0.2:5000", True),
        ("[::1]:5000", True),
        ("localhost:5000", True),
        ("0.0.0.0:5000", False),
        ("[::]:5000", False),
        ("10.1.2.3:1", False),
        ("example.com:443", False),
    ],
)
def test_is_loopback(host_port: str, expected: bool) -> None:
    assert security.is_loopback(host_port) is expected


# ---------------------------------------------------------------------------- real grpc

METHOD = "/caplab.test.Echo/WhoAmI"


async def serve(
    tls: TlsFiles | None, *, require_client_auth: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A server whose one method answers repr(peer_certificate(context)); plaintext if no tls."""

    async def who_am_i(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return repr(security.peer_certificate(context)).encode()

    handler = grpc.method_handlers_generic_handler(
        "caplab.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        creds = security.server_credentials(tls, require_client_auth=require_client_auth)
        port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


async def call(port: int, creds: grpc.ChannelCredentials, target_name: str | None = None) -> str:
    options = [("grpc.ssl_target_name_override", target_name)] if target_name else []
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        rpc: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(METHOD)
        reply: bytes = await rpc(b"", timeout=10)
        return reply.decode()


@pytest.fixture
async def mtls_server(certs: Path) -> AsyncIterator[int]:
    server, port = await serve(security.load_node_tls(certs, "n1"), require_client_auth=True)
    yield port
    await server.stop(None)


@pytest.fixture
async def tls_server(certs: Path) -> AsyncIterator[int]:
    server, port = await serve(security.load_node_tls(certs, "n1"), require_client_auth=False)
    yield port
    await server.stop(None)


async def test_mtls_member_is_identified(certs: Path, mtls_server: int) -> None:
    n2 = security.load_node_tls(certs, "n2")
    creds = security.channel_credentials(n2.ca, n2)
    assert await call(mtls_server, creds) == repr(("n2", "member"))
    assert await call(mtls_server, creds, target_name="n1") == repr(("n2", "member"))


async def test_mtls_wrong_server_name_is_refused(certs: Path, mtls_server: int) -> None:
    n2 = security.load_node_tls(certs, "n2")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(mtls_server, security.channel_credentials(n2.ca, n2), target_name="n2")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_client_without_cert(certs: Path, mtls_server: int) -> None:
    ca = (certs / "ca.crt").read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(mtls_server, security.channel_credentials(ca))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_cert_of_other_ca(
    certs: Path, other_certs: Path, mtls_server: int
) -> None:
    foreign = security.load_node_tls(other_certs, "n2")
    ca = (certs / "ca.crt").read_bytes()  # trusts our server, presents a foreign cert
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(mtls_server, security.channel_credentials(ca, foreign))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_without_client_auth(certs: Path, tls_server: int) -> None:
    ca = (certs / "ca.crt").read_bytes()
    assert await call(tls_server, security.channel_credentials(ca)) == "None"
    reader = security.load_client_tls(certs, "reader")
    assert await call(tls_server, security.channel_credentials(ca, reader)) == "None"


async def test_plaintext_has_no_peer_certificate() -> None:
    server, port = await serve(None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            rpc: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(METHOD)
            assert await rpc(b"", timeout=10) == b"None"
    finally:
        await server.stop(None)
