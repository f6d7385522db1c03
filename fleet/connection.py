"""What the transports learn from an ASGI scope before the first message: who, from where.

Behind the TLS terminator (deploy/), the TCP peer is the proxy; the agent's own address,
the scheme it used and its client certificate arrive in headers. Those headers are
believed only when the peer is one of OPAMP_TRUSTED_PROXIES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings

from fleet.db import db
from signing.agent_credentials import (
    ANONYMOUS,
    OPEN,
    AgentCredential,
    PresentedCredentials,
    auth_mode,
    authenticate_agent,
    is_trusted_proxy,
    presented_credentials,
)

Scope = dict[str, Any]


@dataclass(frozen=True)
class ConnectionInfo:
    peer_address: str  # the TCP peer: the agent, or the proxy in front of us
    agent_address: str  # the agent as far as we can tell
    endpoint: str  # the OpAMP URL the agent used, for connection settings offers
    credentials: PresentedCredentials


def scope_header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return b""


def peer_address(scope: Scope) -> str:
    client = scope.get("client")
    if isinstance(client, (list, tuple)) and client:
        return str(client[0])
    return ""


def _endpoint(scope: Scope, trusted: bool) -> str:
    if settings.OPAMP_AGENT_ENDPOINT:
        return str(settings.OPAMP_AGENT_ENDPOINT)
    secure = scope.get("scheme") in ("https", "wss")
    if trusted:
        forwarded = scope_header(scope, b"x-forwarded-proto").decode("latin-1").strip().lower()
        secure = secure or forwarded in ("https", "wss")
    websocket = scope.get("type") == "websocket"
    scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
    host = scope_header(scope, b"host").decode("latin-1").strip()
    if not host:
        server = scope.get("server") or ("localhost", None)
        host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    return f"{scheme}://{host}{scope.get('path', '/v1/opamp')}"


def connection_info(scope: Scope) -> ConnectionInfo:
    """Read the scope. Raises `CredentialRefused` for a malformed Authorization header."""
    peer = peer_address(scope)
    proxies = settings.OPAMP_TRUSTED_PROXIES
    trusted = is_trusted_proxy(peer, proxies)
    agent_address = peer
    if trusted:
        # The proxy overwrites X-Forwarded-For with the address it accepted (deploy/nginx).
        forwarded_for = scope_header(scope, b"x-forwarded-for").decode("latin-1").split(",")[0].strip()
        agent_address = forwarded_for or peer
    return ConnectionInfo(
        peer_address=peer,
        agent_address=agent_address,
        endpoint=_endpoint(scope, trusted),
        credentials=presented_credentials(scope.get("headers", []), peer, trusted_proxies=proxies),
    )


async def authenticate(info: ConnectionInfo) -> AgentCredential:
    """The connection's credential, or `CredentialRefused`. No database trip when an open
    server sees no credential at all (the common case of the embedded default)."""
    presented = info.credentials
    if not presented.bearer and not presented.client_cert_pem and auth_mode() == OPEN:
        return ANONYMOUS
    return await db(authenticate_agent)(presented)
