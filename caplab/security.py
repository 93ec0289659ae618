"""Certificates of the development CA, and the grpc credentials built from them.

Theory of operation. One self-signed CA per "certs dir" signs every certificate of a
cluster. Members (nodes) hold a certificate with CN=<node id> and OU="member"; they
present it both as a server and, towards their peers, as a client (mutual TLS), so a
node trusts a peer RPC only if the peer's certificate was issued by the same CA and has
OU="member". Clients hold a certificate with CN=<name> and OU=<role> (one of ROLES),
and/or a bearer token; tokens.json maps sha256(token) to (name, role) so the server
never stores a token in clear. Every file is checked at start-up (load_*_tls) so that a
wrong or expired file fails with one clear line instead of a TLS handshake error later.

Layout of a certs dir:
    ca.crt, ca.key                       the CA (ca.key is mode 0600)
    nodes/<node_id>.crt, .key            member certificates
    clients/<name>.crt, .key, .token     client certificates and bearer token (0600)
    tokens.json                          {"<sha256 hex of token>": {"name": ..., "role": ...}}
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLE_MEMBER = "member"
ROLES = ("read-only", "read-write", "admin")  # client roles, weakest first
DEFAULT_CLIENTS = {"admin": "admin", "writer": "read-write", "reader": "read-only"}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BACKDATE = dt.timedelta(hours=1)  # tolerate some clock skew between machines


class SecurityError(Exception):
    """A certificate, key or token file is missing or wrong; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    ca: bytes  # PEM of the CA certificate
    cert: bytes  # PEM of this party's certificate
    key: bytes  # PEM of its private key
    name: str  # CN
    role: str  # OU ("member" or a client role)


# ---------------------------------------------------------------------------- issuing


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path` with `data` (temp file in the same dir, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise SecurityError(f"invalid {kind} {name!r}: use letters, digits, '.', '_', '-'")


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "caplab")]
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def create_ca(dir: Path, *, days: int = 3650) -> None:
    """Create ca.crt and ca.key in `dir`; does nothing if ca.crt exists."""
    if (dir / "ca.crt").exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("caplab development CA")
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(  # key_cert_sign, crl_sign
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(dir / "ca.key", _key_pem(key), 0o600)  # the key first: ca.crt marks "done"
    _write(dir / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _issue(
    dir: Path,
    path: Path,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    eku: list[Any],
    days: int,
) -> None:
    ca_cert = _load_cert(dir / "ca.crt")
    ca_key = _load_key(dir / "ca.key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{dir / 'ca.key'} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(  # digital_signature
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(path.with_suffix(".key"), _key_pem(key), 0o600)
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def create_node_cert(
    dir: Path, node_id: str, *, hosts: Sequence[str] = (), days: int = 825
) -> None:
    """Issue (or re-issue) nodes/<node_id>.crt/.key, valid as TLS server and client."""
    _check_name("node id", node_id)
    sans: list[x509.GeneralName] = []
    for host in (node_id, "localhost", "127.0.0.1", "::1", *hosts):
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        if san not in sans:
            sans.append(san)
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    _issue(dir, dir / "nodes" / f"{node_id}.crt", _name(node_id, ROLE_MEMBER), sans, eku, days)


def create_client_cert(dir: Path, name: str, role: str, *, days: int = 825) -> str:
    """Issue clients/<name>.crt/.key and a fresh bearer token; return the token."""
    _check_name("client name", name)
    if role not in ROLES:
        raise SecurityError(f"unknown role {role!r} for client {name!r}: use one of {ROLES}")
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    _issue(dir, dir / "clients" / f"{name}.crt", _name(name, role), [], eku, days)
    token = secrets.token_urlsafe(32)
    path = dir / "tokens.json"
    tokens = load_tokens(path) if path.exists() else {}
    entries = {h: {"name": n, "role": r} for h, (n, r) in tokens.items() if n != name}
    entries[_hash(token)] = {"name": name, "role": role}
    _write(dir / "clients" / f"{name}.token", f"{token}\n".encode(), 0o600)
    _write(path, (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    return token


@contextmanager
def _locked(dir: Path) -> Iterator[None]:
    dir.mkdir(parents=True, exist_ok=True)
    with open(dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_dev_certs(
    dir: Path, node_ids: Sequence[str], clients: Mapping[str, str] = DEFAULT_CLIENTS
) -> None:
    """Create what is missing; re-issue a certificate that is invalid or expires within a day."""
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with _locked(dir):  # several processes may start at once
        create_ca(dir)
        for node_id in node_ids:
            try:
                load_node_tls(dir, node_id, now=soon)
            except SecurityError:
                create_node_cert(dir, node_id)
        tokens = load_tokens(dir / "tokens.json") if (dir / "tokens.json").exists() else {}
        for name, role in clients.items():
            try:
                ok = load_client_tls(dir, name, now=soon).role == role
                ok = ok and token_identity(tokens, read_token(dir, name)) == (name, role)
            except SecurityError:
                ok = False
            if not ok:
                create_client_cert(dir, name, role)


# ---------------------------------------------------------------------------- loading


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{path} is missing: {hint}") from None
    except OSError as e:
        raise SecurityError(f"cannot read {path}: {e.strerror}") from None


def _parse_cert(path: Path, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SecurityError(f"{path} is not a PEM certificate") from None


def _load_cert(path: Path) -> x509.Certificate:
    return _parse_cert(path, _read(path, "run `caplab certs` to create it"))


def _load_key(path: Path, pem: bytes | None = None) -> Any:
    try:
        return serialization.load_pem_private_key(pem or _read(path, "run `caplab certs`"), None)
    except (ValueError, TypeError):
        raise SecurityError(f"{path} is not an unencrypted PEM private key") from None


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    if not values:
        return ""
    v = values[0].value
    return v if isinstance(v, str) else v.decode()


def _check_time(path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise SecurityError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d} (UTC)"
        )
    if now < cert.not_valid_before_utc:
        raise SecurityError(
            f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
            " (UTC): check the clock"
        )


def _load_tls(
    dir: Path, sub: str, name: str, hint: str, now: dt.datetime | None
) -> tuple[TlsFiles, Path]:
    now = now or dt.datetime.now(dt.UTC)
    ca_path, crt_path, key_path = (
        dir / "ca.crt",
        dir / sub / f"{name}.crt",
        dir / sub / f"{name}.key",
    )
    ca_pem, crt_pem, key_pem = (_read(p, hint) for p in (ca_path, crt_path, key_path))
    ca, cert = _parse_cert(ca_path, ca_pem), _parse_cert(crt_path, crt_pem)
    key = _load_key(key_path, key_pem)
    _check_time(crt_path, cert, now)
    _check_time(ca_path, ca, now)
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # ValueError (issuer name), InvalidSignature, TypeError (key type)
        raise SecurityError(
            f"certificate {crt_path} was not issued by the CA in {ca_path}"
        ) from None
    cn = _attr(cert, NameOID.COMMON_NAME)
    if cn != name:
        raise SecurityError(f"certificate {crt_path} is for {cn!r}, not {name!r}")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise SecurityError(f"key {key_path} does not match certificate {crt_path}")
    ou = _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    return TlsFiles(ca=ca_pem, cert=crt_pem, key=key_pem, name=cn, role=ou), crt_path


def load_node_tls(dir: Path, node_id: str, *, now: dt.datetime | None = None) -> TlsFiles:
    """The checked files of member `node_id`; SecurityError naming the file if anything is off."""
    _check_name("node id", node_id)
    hint = f"run `caplab certs --dir {dir} --node {node_id}`"
    tls, path = _load_tls(dir, "nodes", node_id, hint, now)
    if tls.role != ROLE_MEMBER:
        raise SecurityError(f"certificate {path} has role {tls.role!r}, not {ROLE_MEMBER!r}")
    return tls


def load_client_tls(dir: Path, name: str, *, now: dt.datetime | None = None) -> TlsFiles:
    """The checked files of client `name`; its role (OU) must be one of ROLES."""
    _check_name("client name", name)
    hint = f"run `caplab certs --dir {dir} --client {name}`"
    tls, path = _load_tls(dir, "clients", name, hint, now)
    if tls.role not in ROLES:
        raise SecurityError(f"certificate {path} has unknown role {tls.role!r}, not one of {ROLES}")
    return tls


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, tuple[str, str]]:
    """sha256 hex of a token -> (name, role)."""
    try:
        raw = json.loads(_read(path, "run `caplab certs` to create it"))
        out = {h: (e["name"], e["role"]) for h, e in raw.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise SecurityError(f"{path} is malformed: expected {{sha256: {{name, role}}}}") from None
    for h, (name, role) in out.items():
        if not isinstance(name, str) or role not in ROLES or not re.fullmatch(r"[0-9a-f]{64}", h):
            raise SecurityError(f"{path} has a bad entry for {name!r} (role {role!r})")
    return out


def token_identity(tokens: Mapping[str, tuple[str, str]], token: str) -> tuple[str, str] | None:
    """(name, role) of a bearer token, or None if it is unknown."""
    return tokens.get(_hash(token))


def read_token(dir: Path, name: str) -> str:
    _check_name("client name", name)
    path = dir / "clients" / f"{name}.token"
    token = _read(path, f"run `caplab certs --dir {dir} --client {name}`").decode().strip()
    if not token:
        raise SecurityError(f"{path} is empty")
    return token


# ---------------------------------------------------------------------------- grpc


def server_credentials(tls: TlsFiles, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """Note: with require_client_auth=False grpc does not even ask for a client certificate."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=require_client_auth
    )


def channel_credentials(ca: bytes, tls: TlsFiles | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=tls.key if tls else None,
        certificate_chain=tls.cert if tls else None,
    )


_PEER_CACHE: dict[bytes, tuple[str, str] | None] = {}
_PEER_CACHE_MAX = 256


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str] | None:
    """(CN, OU) of the CA-verified client certificate of this call, or None."""
    auth = context.auth_context()
    if list(auth.get("transport_security_type", ())) != [b"ssl"]:
        return None
    pems = list(auth.get("x509_pem_cert", ()))
    if not pems:
        return None
    pem = pems[0]
    if pem not in _PEER_CACHE:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            ident: tuple[str, str] | None = (
                _attr(cert, NameOID.COMMON_NAME),
                _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME),
            )
        except ValueError:
            ident = None
        if len(_PEER_CACHE) >= _PEER_CACHE_MAX:
            del _PEER_CACHE[next(iter(_PEER_CACHE))]
        _PEER_CACHE[pem] = ident
    return _PEER_CACHE[pem]


def cert_summary(pem: bytes) -> str:
    """'CN=n1 OU=member, valid until 2028-01-02 03:04 UTC'."""
    cert = _parse_cert(Path("<certificate>"), pem)
    cn, ou = _attr(cert, NameOID.COMMON_NAME), _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    return f"CN={cn} OU={ou}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def is_loopback(host_port: str) -> bool:
    """True iff the host of 'host:port' (or '[v6]:port') is localhost or a loopback IP."""
    host = host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port
    if host.startswith("["):
        host = host[1 : host.find("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
