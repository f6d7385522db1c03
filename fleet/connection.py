"""What the transports learn from an ASGI scope before the first message: who, from where.

Behind the TLS terminator (deploy/), the TCP peer is the proxy; the agent's own address,
the scheme it used and its client certificate arrive in headers. Those headers are
believed only when the peer is one of OPAMP_TRUSTED_PROXIES: sent straight to the app
they are ignored, so a client cannot claim a certificate it does not hold. What the
credentials presented are worth is the registered authority's to say (fleet.credentials).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_to_bytes

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from fleet.credentials import ANONYMOUS, AgentCredential, CredentialAuthority, CredentialRefused, PresentedCredentials
from fleet.db import db

logger = logging.getLogger(__name__)

Scope = dict[str, Any]

CLIENT_CERT_HEADER = b"x-client-cert"
CLIENT_VERIFY_HEADER = b"x-client-verify"
VERIFIED = b"SUCCESS"

AUTHORIZATION_MALFORMED = "the Authorization header must be 'Bearer <enrollment token>'"


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


@lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(proxy.strip(), strict=False) for proxy in proxies if proxy.strip())
    except ValueError as error:
        raise ImproperlyConfigured(f"OPAMP_TRUSTED_PROXIES: {error}") from None


def is_trusted_proxy(address: str, proxies: Sequence[str]) -> bool:
    """Whether `address` (the TCP peer) is one of the configured TLS terminators."""
    networks = _networks(tuple(proxies))
    if not networks or not address:
        return False
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False  # a unix socket peer or garbage: never a configured proxy
    return any(peer in network for network in networks)


def presented_credentials(
    headers: Iterable[tuple[bytes, bytes]], peer_address: str, *, trusted_proxies: Sequence[str]
) -> PresentedCredentials:
    """Read the credential headers of an ASGI scope. Raises CredentialRefused if malformed."""
    authorization = b""
    forwarded_cert = b""
    verify = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            authorization = value.strip()
        elif lowered == CLIENT_CERT_HEADER:
            forwarded_cert = value.strip()
        elif lowered == CLIENT_VERIFY_HEADER:
            verify = value.strip()

    bearer = ""
    if authorization:
        scheme, _, secret = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not secret.strip():
            raise CredentialRefused(AUTHORIZATION_MALFORMED)
        bearer = secret.strip().decode("ascii", "replace")

    client_cert_pem = b""
    if forwarded_cert or verify:
        if is_trusted_proxy(peer_address, trusted_proxies):
            if verify == VERIFIED and forwarded_cert:
                client_cert_pem = unquote_to_bytes(forwarded_cert)
        else:
            # Not from our TLS terminator: whoever sent it may not choose who they are.
            logger.info("ignoring client-certificate headers from %s: not a trusted proxy", peer_address or "?")
    return PresentedCredentials(bearer=bearer, client_cert_pem=client_cert_pem)


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


async def authenticate(info: ConnectionInfo, authority: CredentialAuthority) -> AgentCredential:
    """The connection's credential, or `CredentialRefused`. No database trip when an open
    server sees no credential at all (the common case of the embedded default)."""
    presented = info.credentials
    if not presented.bearer and not presented.client_cert_pem and authority.admits_anonymous():
        return ANONYMOUS
    return await db(authority.authenticate)(presented)
