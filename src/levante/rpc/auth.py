"""Bearer tokens with roles, and TLS, for both ends of a connection.

This module owns:

* the token table: each line ``ROLE:SHA256HEX`` (from ``--auth-tokens FILE`` and the
  ``LEVANTE_AUTH_TOKENS`` environment variable). Only hashes are kept; a presented
  token is hashed and compared with every entry in constant time;
* which role may call which method (``roles_for``): ``client`` the Engine service,
  ``worker`` the Workers service and ``Engine/TaskComplete`` (to finish a deferred
  task), ``admin`` everything. Health checks need no token; reflection needs a token of
  any role; a method of any other service needs ``admin``;
* ``AuthInterceptor``, the grpc.aio server interceptor that refuses a call before its
  request is decoded: no token or an unknown one is UNAUTHENTICATED, a role that may not
  call the method PERMISSION_DENIED (codes from rpc/status.py);
* TLS: the server's credentials (a client certificate is required when a CA is given)
  and ``ClientCredentials``, the token and TLS files a client, the CLI and the worker
  connect with.

With no token configured, authentication is off and every call is let through.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import grpc

from levante.errors import LevanteError, PermissionDeniedError, UnauthenticatedError
from levante.rpc.status import status_for

__all__ = [
    "ROLES",
    "AuthInterceptor",
    "ClientCredentials",
    "Role",
    "TokenEntry",
    "hash_token",
    "load_tokens",
    "new_token",
    "parse_tokens",
    "roles_for",
    "server_credentials",
]

log = logging.getLogger("levante.rpc.auth")

Role = Literal["client", "worker", "admin"]
ROLES: Final[tuple[Role, ...]] = ("client", "worker", "admin")
ENV_TOKENS: Final = "LEVANTE_AUTH_TOKENS"

_OPEN: Final[frozenset[Role]] = frozenset()  # no token needed
_ANY: Final[frozenset[Role]] = frozenset(ROLES)
_ADMIN: Final[frozenset[Role]] = frozenset({"admin"})

# Roles allowed per service, then per method where a method differs from its service.
_ROLES_BY_SERVICE: Final[dict[str, frozenset[Role]]] = {
    "levante.v1.Engine": frozenset({"client", "admin"}),
    "levante.v1.Workers": frozenset({"worker", "admin"}),
    "grpc.health.v1.Health": _OPEN,
    "grpc.reflection.v1.ServerReflection": _ANY,
    "grpc.reflection.v1alpha.ServerReflection": _ANY,
}
_ROLES_BY_METHOD: Final[dict[str, frozenset[Role]]] = {
    # A worker whose action deferred its task may finish it later itself.
    "/levante.v1.Engine/TaskComplete": frozenset({"client", "worker", "admin"}),
}

_HEX64 = re.compile(r"[0-9a-f]{64}")


def roles_for(method: str) -> frozenset[Role]:
    """The roles that may call ``method`` (``/package.Service/Method``); empty: anyone."""
    if method in _ROLES_BY_METHOD:
        return _ROLES_BY_METHOD[method]
    service = method.lstrip("/").split("/", 1)[0]
    return _ROLES_BY_SERVICE.get(service, _ADMIN)


# --------------------------------------------------------------------- tokens


def hash_token(token: str) -> str:
    """What the token table stores for ``token``: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    role: Role
    digest: str  # SHA-256 hex of the token

    def line(self) -> str:
        return f"{self.role}:{self.digest}"


def parse_tokens(text: str, source: str) -> tuple[TokenEntry, ...]:
    """Entries ``ROLE:SHA256HEX``, one a line (or separated by commas or blanks).

    ``#`` starts a comment. Raises ValueError naming ``source`` and the line.
    """
    entries: list[TokenEntry] = []
    for number, line in enumerate(text.splitlines(), 1):
        for item in line.split("#", 1)[0].replace(",", " ").split():
            role, _, digest = item.partition(":")
            digest = digest.lower()
            if role not in ROLES:
                raise ValueError(
                    f"{source}, line {number}: role {role!r} is not one of {', '.join(ROLES)} "
                    "(entries are ROLE:SHA256HEX)"
                )
            if not _HEX64.fullmatch(digest):
                raise ValueError(
                    f"{source}, line {number}: {role}: expected the token's SHA-256 as 64 hex "
                    "digits (levante token hash prints it), not the token itself"
                )
            entries.append(TokenEntry(role, digest))
    return tuple(entries)


def load_tokens(path: str | Path | None, env: str | None) -> tuple[TokenEntry, ...]:
    """The token table from a file and the value of LEVANTE_AUTH_TOKENS, together."""
    entries: list[TokenEntry] = []
    if path:
        entries += parse_tokens(Path(path).read_text(), str(path))
    if env:
        entries += parse_tokens(env, ENV_TOKENS)
    return tuple(entries)


class _TokenTable:
    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple((e.role, bytes.fromhex(e.digest)) for e in entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def roles(self, token: str) -> frozenset[Role]:
        """Every role ``token`` has; each entry is compared, in constant time."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: set[Role] = set()
        for role, stored in self._entries:
            if hmac.compare_digest(digest, stored):
                found.add(role)
        return frozenset(found)


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


# --------------------------------------------------------------------- server side


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through only when its bearer token has a role the method allows."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._table = _TokenTable(entries)

    def check(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> LevanteError | None:
        """None when the call may go on, else the error that refuses it."""
        allowed = roles_for(method)
        if not self._table or not allowed:
            return None
        token = _bearer(metadata)
        if token is None:
            return UnauthenticatedError(
                f"{method}: a bearer token is required (metadata 'authorization: Bearer TOKEN')"
            )
        roles = self._table.roles(token)
        if not roles:
            return UnauthenticatedError(f"{method}: the bearer token is not known to this server")
        if not roles & allowed:
            return PermissionDeniedError(
                f"{method}: role {', '.join(sorted(roles))} may not call it "
                f"(allowed: {', '.join(r for r in ROLES if r in allowed)})"
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        error = self.check(method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if error is None or handler is None:
            return handler
        log.warning("refused %s: %s", method, type(error).__name__)
        return _refusing(handler, error)


def _refusing(handler: grpc.RpcMethodHandler, error: LevanteError) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends the call with ``error``'s status.

    Its requests are never decoded: nothing a refused caller sent is parsed.
    """
    code, message = status_for(error)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serializer)


def server_credentials(cert: str | Path, key: str | Path, ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:  # fmt: skip
    """TLS for ``levante serve``; with ``ca``, clients must present a certificate it signed."""
    root = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


# --------------------------------------------------------------------- client side


@dataclass(frozen=True)
class ClientCredentials:
    """How a client, the CLI or a worker connects: a bearer token, TLS, or neither.

    TLS is used when a CA (to verify the server) or a client certificate is given.
    """

    token: str | None = None
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(
        cls,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> ClientCredentials:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        return cls(
            token=token or None,
            root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            private_key=Path(tls_key).read_bytes() if tls_key else None,
        )

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None or self.certificate_chain is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the bearer token, if there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(
        self, target: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
        return grpc.aio.secure_channel(target, credentials, options=options)
