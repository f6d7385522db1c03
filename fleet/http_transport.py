"""The OpAMP plain-HTTP transport: POST /v1/opamp, raw protobuf in and out.

A raw ASGI application rather than a Django view, so the size limit is enforced while
the body streams in (Content-Length first, then the running total, then the inflated
size of a gzip body) instead of after Django has buffered it. The server
(opamp_site/server.py) starts this application as soon as a request's headers are in, so
everything decided before `read_body` (the credential, the announced length) costs the
server none of the body.
"""

from __future__ import annotations

import gzip
import logging
import math
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from fleet.admission import UNAVAILABLE_MESSAGE, reconnect_admission_cost
from fleet.connection import authenticate, connection_info
from fleet.credentials import CredentialRefused
from fleet.protocol_errors import error_reply
from fleet.session import AgentSession
from fleet.session_runtime import runtime
from opamp.codec import FrameError, decode_agent_to_server
from opamp.proto import opamp_pb2

logger = logging.getLogger(__name__)

PROTOBUF = b"application/x-protobuf"
INSTANCE_UID_HEADER = b"opamp-instance-uid"
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class BadBody(Exception):
    pass


def inflate_gzip(data: bytes, limit: int) -> bytes:
    """Inflate at most `limit` bytes; a bomb is refused after `limit`, never inflated whole."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise BadBody(f"invalid gzip body: {error}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge
    if not inflater.eof:
        raise BadBody("invalid gzip body: truncated stream")
    return out


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise BadBody("client went away")
        chunk = event.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


def header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return b""


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_text(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await respond(send, status, text.encode(), [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])])


async def respond_message(scope: Scope, send: Send, message: opamp_pb2.ServerToAgent, status: int = 200) -> None:
    body = message.SerializeToString()
    headers = [(b"content-type", PROTOBUF)]
    if b"gzip" in header(scope, b"accept-encoding").lower() and len(body) > 512:
        body = gzip.compress(body, compresslevel=5)
        headers.append((b"content-encoding", b"gzip"))
    headers.append((b"content-length", str(len(body)).encode()))
    await respond(send, status, body, headers)


def http_admission_refused(scope: Scope) -> float | None:
    """Before the body is read: refuse when this process admits no one now (fleet.admission).

    A polling agent this process already knows (its OpAMP-Instance-UID header names one) is
    past admission; for the others the session takes the tokens once it knows the price,
    this only spares the body when not even the cheapest admission would go through.
    """
    fleet = runtime()
    if not fleet.admission.enabled:
        return None
    try:
        known = uuid.UUID(header(scope, INSTANCE_UID_HEADER).decode("ascii", "replace")) in fleet.snapshots
    except ValueError:
        known = False
    return None if known else fleet.admission.would_refuse(reconnect_admission_cost())


async def respond_unavailable(send: Send, retry_after: float) -> None:
    """503 with Retry-After in whole seconds (rounded up: never sooner than the bucket said)."""
    seconds = str(max(1, math.ceil(retry_after))).encode()
    await respond_text(send, 503, f"{UNAVAILABLE_MESSAGE}\n", [(b"retry-after", seconds)])


async def opamp_http_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Thin: method, size and encoding checks, decode, one session call, encode."""
    if scope["method"] != "POST":
        await respond_text(send, 405, "OpAMP over HTTP uses POST\n", [(b"allow", b"POST")])
        return
    if (retry_after := http_admission_refused(scope)) is not None:
        await respond_unavailable(send, retry_after)
        return
    try:
        info = connection_info(scope)
        credential = await authenticate(info, runtime().credentials)
    except CredentialRefused as error:
        # Before the body is read: an unauthenticated sender costs us no parsing.
        logger.info("refused an OpAMP request from %s: %s", scope.get("client"), error.message)
        await respond_text(send, 401, f"{error.message}\n", [(b"www-authenticate", b'Bearer realm="opamp"')])
        return
    limit = settings.OPAMP_MAX_MESSAGE_BYTES
    declared = header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        await respond_text(send, 413, f"message larger than {limit} bytes\n")
        return
    encoding = header(scope, b"content-encoding").strip().lower()
    try:
        body = await read_body(receive, limit)
        if encoding == b"gzip":
            body = inflate_gzip(body, limit)
        elif encoding not in (b"", b"identity"):
            raise BadBody(f"unsupported Content-Encoding {encoding.decode(errors='replace')!r}")
        message = decode_agent_to_server(body)
    except BodyTooLarge:
        await respond_text(send, 413, f"message larger than {limit} bytes\n")
        return
    except (BadBody, FrameError) as error:
        # 400 with a BadRequest ServerToAgent, so protobuf clients can read the reason too.
        await respond_message(scope, send, error_reply(instance_uid=b"", message=str(error)), status=400)
        return
    session = AgentSession(
        transport="http", remote_address=info.agent_address, credential=credential, endpoint=info.endpoint
    )
    reply = await session.handle(message)
    if reply.error_response.type == opamp_pb2.ServerErrorResponseType_Unavailable and reply.HasField("error_response"):
        await respond_unavailable(send, reply.error_response.retry_info.retry_after_nanoseconds / 1e9)
        return
    rejected = reply.error_response.type == opamp_pb2.ServerErrorResponseType_BadRequest and reply.HasField(
        "error_response"
    )
    await respond_message(scope, send, reply, status=400 if rejected else 200)
