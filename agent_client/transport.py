"""How an agent reaches the server: WebSocket or plain-HTTP polling, behind one interface.

To the agent both transports look alike: `connect`, `send` an AgentToServer, `receive`
the next ServerToAgent, `close`. Over WebSocket a reply or a server push arrives whenever
the server sends it. Over HTTP every `send` is a POST whose response is queued for
`receive`, so the server can only speak when the agent polls (`polls` is True).

Every failure surfaces as TransportError; the agent answers it by reconnecting with
backoff, at the earliest after the error's `retry_after` (from `Retry-After` on 429/503).
A 401 or 403 (a WebSocket handshake cannot be answered with 401 by every server, hence
403 too) is a `CredentialRefused`: the token or the client certificate was not accepted.

TLS (wss://, https://): the server is verified against `ca_file` when given, else against
each library's default trust store (WebSocket: the system's, as `ssl.create_default_context`
loads it; HTTP: httpx's, certifi or SSL_CERT_FILE / SSL_CERT_DIR when `trust_env`). The
agent sets per-connection credentials with `set_credentials` before each `connect`: extra
headers (the enrollment token) and a client certificate presented in the TLS handshake.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ssl
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from agent_client.version import USER_AGENT
from opamp.codec import FrameError, decode_server_to_agent, decode_server_ws_frame, encode_ws_frame
from opamp.proto import opamp_pb2 as pb

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
INSTANCE_UID_HEADER = "OpAMP-Instance-UID"
# The protocol's default message size limit, applied after decompression.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RETRY_STATUSES = frozenset({429, 503})
CREDENTIAL_STATUSES = frozenset({401, 403})

TransportKind = Literal["ws", "http"]
_WS_SCHEMES = {"ws": "http", "wss": "https"}
_HTTP_SCHEMES = {"http": "ws", "https": "wss"}


class TransportError(Exception):
    """The exchange with the server failed; reconnect, not before `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CredentialRefused(TransportError):
    """The server refused the connection's credential (HTTP 401 or 403)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"server refused the credential (HTTP {status})")
        self.status = status


@dataclass(frozen=True)
class ClientCertificate:
    """A TLS client certificate and its private key, as PEM files."""

    cert_file: Path
    key_file: Path


class Transport(Protocol):
    url: str
    polls: bool

    @property
    def secure(self) -> bool:
        """True when the connection runs over TLS (so a client certificate can be presented)."""
        ...

    def set_credentials(self, headers: Mapping[str, str], client_certificate: ClientCertificate | None) -> None:
        """Credentials for the next `connect`: extra request headers and a TLS client certificate."""
        ...

    async def connect(self) -> None: ...

    async def send(self, message: pb.AgentToServer) -> None: ...

    async def receive(self) -> pb.ServerToAgent: ...

    async def close(self) -> None: ...


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retry_hint(status: int, retry_after: str | None) -> float | None:
    # Retry-After means "come back later" only on the overload statuses.
    return parse_retry_after(retry_after) if status in RETRY_STATUSES else None


@functools.cache
def _tls_context(trust_env: bool) -> ssl.SSLContext:
    # Loading the CA bundle takes ~20 ms, and an httpx client loads it afresh unless given
    # a context: a simulated fleet of thousands would spend seconds doing only that.
    return httpx.create_ssl_context(trust_env=trust_env)


def tls_context(
    *,
    ca_file: str | Path | None,
    client_certificate: ClientCertificate | None,
    default: Callable[[], ssl.SSLContext] = ssl.create_default_context,
) -> ssl.SSLContext:
    """A new context for a TLS connection: whom to trust (`ca_file`, else a context from
    `default`) and which certificate to present. New each time: a client certificate loaded
    into a shared context would be presented on every connection of the process."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else default()
        if client_certificate is not None:
            context.load_cert_chain(certfile=client_certificate.cert_file, keyfile=client_certificate.key_file)
    except (OSError, ssl.SSLError) as error:
        # ssl errors name files, never key material.
        raise TransportError(f"cannot set up TLS: {_error_text(error)}") from error
    return context


def _refusal(status: int, retry_after: str | None, message: str) -> TransportError:
    if status in CREDENTIAL_STATUSES:
        return CredentialRefused(status)
    return TransportError(message, retry_after=_retry_hint(status, retry_after))


def _error_text(error: BaseException) -> str:
    # Several httpx and asyncio errors have an empty str(); the class name still says a lot.
    return str(error) or type(error).__name__


class WebSocketTransport:
    """One WebSocket per connection; frames carry the 0x00 header the protocol requires."""

    polls = False

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        trust_env: bool = True,
        ca_file: str | Path | None = None,
    ) -> None:
        if urlsplit(url).scheme not in _WS_SCHEMES:
            raise ValueError(f"a WebSocket server URL starts with ws:// or wss://, not {url!r}")
        self.url = url
        self.headers = dict(headers or {})
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.max_message_bytes = max_message_bytes
        self.trust_env = trust_env
        self.ca_file = ca_file
        self.credential_headers: dict[str, str] = {}
        self.client_certificate: ClientCertificate | None = None
        self._connection: ClientConnection | None = None

    @property
    def secure(self) -> bool:
        return urlsplit(self.url).scheme == "wss"

    def set_credentials(self, headers: Mapping[str, str], client_certificate: ClientCertificate | None) -> None:
        self.credential_headers = dict(headers)
        self.client_certificate = client_certificate

    async def connect(self) -> None:
        options: dict[str, Any] = {}
        if self.secure and (self.ca_file is not None or self.client_certificate is not None):
            options["ssl"] = tls_context(ca_file=self.ca_file, client_certificate=self.client_certificate)
        try:
            self._connection = await connect(
                self.url,
                additional_headers={**self.headers, **self.credential_headers},
                user_agent_header=USER_AGENT,
                # permessage-deflate costs the server far more memory per connection than
                # it saves on messages this small.
                compression=None,
                open_timeout=self.open_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_interval,
                max_size=self.max_message_bytes,
                proxy=True if self.trust_env else None,
                **options,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            raise _refusal(
                status,
                error.response.headers.get("Retry-After"),
                f"server refused the WebSocket upgrade: HTTP {status}",
            ) from error
        except (OSError, WebSocketException) as error:
            raise TransportError(f"cannot connect to {self.url}: {_error_text(error)}") from error

    def _require(self) -> ClientConnection:
        if self._connection is None:
            raise TransportError("not connected")
        return self._connection

    async def send(self, message: pb.AgentToServer) -> None:
        connection = self._require()
        try:
            await connection.send(encode_ws_frame(message))
        except ConnectionClosed as error:
            raise TransportError(f"connection closed: {error}") from error

    async def receive(self) -> pb.ServerToAgent:
        connection = self._require()
        try:
            frame = await connection.recv()
        except ConnectionClosed as error:
            raise TransportError(f"connection closed: {error}") from error
        if isinstance(frame, str):
            raise TransportError("server sent a text frame; OpAMP uses binary frames only")
        try:
            return decode_server_ws_frame(frame)
        except FrameError as error:
            raise TransportError(f"malformed frame from the server: {error}") from error

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


class HttpTransport:
    """Plain-HTTP polling: each message is one POST of the raw protobuf."""

    polls = True

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        trust_env: bool = True,
        ca_file: str | Path | None = None,
    ) -> None:
        if urlsplit(url).scheme not in _HTTP_SCHEMES:
            raise ValueError(f"an HTTP server URL starts with http:// or https://, not {url!r}")
        self.url = url
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.trust_env = trust_env
        self.ca_file = ca_file
        self.credential_headers: dict[str, str] = {}
        self.client_certificate: ClientCertificate | None = None
        self._client: httpx.AsyncClient | None = None
        self._replies: asyncio.Queue[pb.ServerToAgent] = asyncio.Queue()

    @property
    def secure(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    def set_credentials(self, headers: Mapping[str, str], client_certificate: ClientCertificate | None) -> None:
        self.credential_headers = dict(headers)
        self.client_certificate = client_certificate

    async def connect(self) -> None:
        # Nothing goes on the wire until the first POST; a new client per connection drops
        # any pooled socket the server may already have given up on.
        verify = _tls_context(self.trust_env)
        if self.secure and (self.ca_file is not None or self.client_certificate is not None):
            verify = tls_context(
                ca_file=self.ca_file,
                client_certificate=self.client_certificate,
                default=functools.partial(httpx.create_ssl_context, trust_env=self.trust_env),
            )
        self._client = httpx.AsyncClient(
            headers={**self.headers, **self.credential_headers, "User-Agent": USER_AGENT, "Accept-Encoding": "gzip"},
            timeout=self.timeout,
            trust_env=self.trust_env,
            verify=verify,
        )
        self._replies = asyncio.Queue()

    async def send(self, message: pb.AgentToServer) -> None:
        if self._client is None:
            raise TransportError("not connected")
        headers = {"Content-Type": PROTOBUF_CONTENT_TYPE}
        if len(message.instance_uid) == 16:
            headers[INSTANCE_UID_HEADER] = str(uuid.UUID(bytes=message.instance_uid))
        try:
            async with self._client.stream(
                "POST", self.url, content=message.SerializeToString(), headers=headers
            ) as response:
                if not response.is_success:
                    raise _refusal(
                        response.status_code,
                        response.headers.get("Retry-After"),
                        f"server answered HTTP {response.status_code}",
                    )
                body = await self._read_body(response)
        except httpx.HTTPError as error:
            raise TransportError(f"POST {self.url} failed: {_error_text(error)}") from error
        try:
            reply = decode_server_to_agent(body)
        except FrameError as error:
            raise TransportError(str(error)) from error
        self._replies.put_nowait(reply)

    async def _read_body(self, response: httpx.Response) -> bytes:
        # aiter_bytes yields decompressed bytes, so the limit holds against a gzip bomb
        # without inflating all of it.
        chunks = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_message_bytes:
                raise TransportError(f"reply larger than {self.max_message_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def receive(self) -> pb.ServerToAgent:
        return await self._replies.get()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def transport_for_url(
    url: str,
    *,
    kind: TransportKind | None = None,
    headers: Mapping[str, str] | None = None,
    trust_env: bool = True,
    ping_interval: float | None = 20.0,
    ca_file: str | Path | None = None,
) -> WebSocketTransport | HttpTransport:
    """The transport for `url`: by its scheme, or `kind` with the scheme swapped to match.

    `ws://host/v1/opamp` with kind "http" polls `http://host/v1/opamp`: a server serves
    both transports on the same path. `ping_interval` (WebSocket keepalive) is ignored
    for HTTP. `ca_file` verifies a TLS server against that bundle instead of the default
    trust store.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in _WS_SCHEMES and scheme not in _HTTP_SCHEMES:
        raise ValueError(f"unsupported server URL scheme in {url!r}: use ws, wss, http or https")
    if kind is None:
        kind = "http" if scheme in _HTTP_SCHEMES else "ws"
    if kind == "http" and scheme in _WS_SCHEMES:
        url = urlunsplit(parts._replace(scheme=_WS_SCHEMES[scheme]))
    elif kind == "ws" and scheme in _HTTP_SCHEMES:
        url = urlunsplit(parts._replace(scheme=_HTTP_SCHEMES[scheme]))
    if kind == "http":
        return HttpTransport(url, headers=headers, trust_env=trust_env, ca_file=ca_file)
    return WebSocketTransport(url, headers=headers, trust_env=trust_env, ping_interval=ping_interval, ca_file=ca_file)
