"""Who may call what: one gRPC server interceptor per listener.

Theory of operation
-------------------
A node has up to two listeners (``caplab.server``):

* the **peer listener** (``--peer-listen``): the stores' peer services and the client
  requests a follower forwards to its leader. With certificates it requires mutual TLS:
  the handshake refuses a caller without a certificate of the cluster's CA, and
  :class:`MembersOnly` refuses every call whose certificate is not a member's (OU
  ``member``: a client certificate of the same CA does not make its holder a member).
  Which member is calling is its certificate's CN; the stores check that every message's
  ``sender`` names that member (``member_of``), so n2 cannot speak as n3.
* the **client listener** (``--listen``): KV, Cluster, Admin, health and reflection.
  With ``--client-auth`` (:class:`ClientRoles`) a call must carry a bearer token
  (``authorization: Bearer <token>``, looked up in ``tokens.json``) or, with
  ``--client-cert-auth`` (TLS that requires one), a client certificate. Its role
  decides: ``read-only`` reads (Get, Status, Dump, reflection), ``read-write`` also
  writes, ``admin`` also calls Admin. A member certificate may call anything. Health
  checks need no credentials (load balancers probe them). Without ``--client-auth`` the
  listener is open: the local lab's default, on loopback only (``caplab node`` refuses a
  plaintext listener on another address without ``--insecure``).

Refusals: no credentials, or an unknown token: UNAUTHENTICATED; a role too weak, or a
non-member on the peer listener: PERMISSION_DENIED; each says what is needed.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, TypeAlias

import grpc

from caplab.security import ROLE_MEMBER, ROLES, peer_certificate, token_identity
from caplab.store import NodeConfig

__all__ = ["ClientRoles", "MembersOnly", "authenticated_member", "member_of", "required_role"]

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # (subscriptable in the stubs only)
# (allowed, status code, message) for one call
Check = Callable[[str, Context], tuple[bool, grpc.StatusCode, str]]

_WRITES = {"Put", "Delete", "CompareAndSwap", "Increment"}

# Whether the caller of the call being served may write: set per call by ClientRoles
# (default True: the listener is open). KV.Pipeline carries reads and writes in one call
# and checks each write against it (caplab.pipeline_server).
may_write: ContextVar[bool] = ContextVar("caplab_may_write", default=True)
_OPEN = ("/grpc.health.v1.Health/",)


def required_role(method: str) -> str:
    """The weakest client role that may call ``method`` (a full gRPC method name)."""
    service, _, name = method.rpartition("/")
    if service.endswith(".Admin"):
        return "admin"
    if service.endswith(".KV") and name in _WRITES:
        return "read-write"
    if service.endswith(".KV") or service.endswith(".Cluster") or "reflection" in service:
        return "read-only"
    return ROLE_MEMBER  # peer services, and anything not named here


def member_of(context: Context) -> str | None:
    """The member id a call was authenticated as (its certificate's CN), or None if the
    call carried no member certificate (plaintext: the caller is not authenticated)."""
    ident = peer_certificate(context)
    if ident is None or ident[1] != ROLE_MEMBER:
        return None
    return ident[0]


def _metadata(context: Context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class _Interceptor(grpc.aio.ServerInterceptor):
    """Wraps each method handler so that ``check`` runs first, with the call's context
    (a server interceptor alone sees the metadata, not the TLS peer)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], Handler] = {}

    def check(self, method: str, context: Context) -> tuple[bool, grpc.StatusCode, str]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        key = (method, id(handler))
        wrapped = self._cache.get(key)
        if wrapped is None:
            wrapped = self._wrap(method, handler)
            if len(self._cache) < 1024:
                self._cache[key] = wrapped
        return wrapped

    def _wrap(self, method: str, h: Any) -> Handler:
        # (h: an aio handler; the grpc stubs type handlers as synchronous)
        check = self.check

        async def deny(context: Context) -> bool:
            ok, code, message = check(method, context)
            if not ok:
                await context.abort(code, message)
            return ok

        req, resp = h.request_deserializer, h.response_serializer
        if h.unary_unary is not None:
            inner_uu = h.unary_unary

            async def uu(request: Any, context: Context) -> Any:
                await deny(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(uu, req, resp)
        if h.unary_stream is not None:
            inner_us = h.unary_stream
            if not inspect.isasyncgenfunction(inner_us):
                # one that writes its responses itself (the health service's Watch)

                async def us_write(request: Any, context: Context) -> None:
                    await deny(context)
                    await inner_us(request, context)

                return grpc.unary_stream_rpc_method_handler(us_write, req, resp)

            async def us(request: Any, context: Context) -> AsyncIterator[Any]:
                await deny(context)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(us, req, resp)
        if h.stream_unary is not None:
            inner_su = h.stream_unary

            async def su(requests: Any, context: Context) -> Any:
                await deny(context)
                return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(su, req, resp)
        inner_ss = h.stream_stream
        assert inner_ss is not None

        async def ss(requests: Any, context: Context) -> AsyncIterator[Any]:
            await deny(context)
            async for item in inner_ss(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(ss, req, resp)


class MembersOnly(_Interceptor):
    """The peer listener with certificates: every call needs a member certificate."""

    def check(self, method: str, context: Context) -> tuple[bool, grpc.StatusCode, str]:
        ident = peer_certificate(context)
        if ident is not None and ident[1] == ROLE_MEMBER:
            return True, grpc.StatusCode.OK, ""
        who = "no certificate" if ident is None else f"{ident[0]!r} (role {ident[1]})"
        return (
            False,
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is for cluster members only (a member certificate of this cluster's "
            f"CA); the caller presented {who}",
        )


class ClientRoles(_Interceptor):
    """The client listener with ``--client-auth``: a token or client certificate, and a
    role strong enough for the method."""

    def __init__(self, tokens: Mapping[str, tuple[str, str]]) -> None:
        super().__init__()
        self._tokens = tokens

    def identity(self, context: Context) -> tuple[str, str] | None:
        auth = _metadata(context, "authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token_identity(self._tokens, token.strip())
            return None
        return peer_certificate(context)

    def check(self, method: str, context: Context) -> tuple[bool, grpc.StatusCode, str]:
        if method.startswith(_OPEN):
            return True, grpc.StatusCode.OK, ""
        need = required_role(method)
        ident = self.identity(context)
        if ident is None:
            sent = _metadata(context, "authorization") is not None
            return (
                False,
                grpc.StatusCode.UNAUTHENTICATED,
                ("the bearer token is not valid for this cluster" if sent else "no credentials")
                + f": {method} needs a bearer token (metadata 'authorization: Bearer <token>') "
                "or a client certificate of this cluster's CA",
            )
        name, role = ident
        if role == ROLE_MEMBER or (
            need in ROLES and role in ROLES and ROLES.index(role) >= ROLES.index(need)
        ):
            # (KV.Pipeline carries reads and writes: it checks each write against this)
            may_write.set(role == ROLE_MEMBER or (role in ROLES and role != ROLES[0]))
            return True, grpc.StatusCode.OK, ""
        return (
            False,
            grpc.StatusCode.PERMISSION_DENIED,
            f"client {name!r} has role {role}; {method} needs role {need}",
        )


async def authenticated_member(config: NodeConfig, context: Context) -> str | None:
    """For a peer service's handler: the member the call was authenticated as, None on a
    plaintext peer listener (``--insecure``); a call over TLS without a member certificate
    is refused (the listener's interceptor refuses it first: this is the second lock)."""
    if config.tls is None:
        return None
    member = member_of(context)
    if member is None:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, "peer services need a member certificate"
        )
    return member
