"""In-process fake OpAMP servers on 127.0.0.1 for tests: one WebSocket, one plain HTTP.

Both record every AgentToServer they receive and answer it through a `responder`, a
function from the received message to the reply (None: no reply over WebSocket, an empty
ServerToAgent over HTTP, which must answer every POST). The default responder echoes the
instance_uid and declares the server's capabilities, as the protocol asks of every reply.
Tests read what arrived with `next_message()`, which waits, so they need no sleeps.

Given an `ssl_context` (a server context) either fake serves TLS (wss:// / https://) and
records, per connection, the client certificate the agent presented (DER, or None).
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from opamp.capabilities import ServerCapabilities
from opamp.codec import FrameError, decode_agent_to_server, decode_agent_ws_frame, encode_ws_frame
from opamp.proto import opamp_pb2 as pb

OPAMP_PATH = "/v1/opamp"
Responder = Callable[[pb.AgentToServer], pb.ServerToAgent | None]
SERVER_CAPABILITIES = int(
    ServerCapabilities.ACCEPTS_STATUS
    | ServerCapabilities.OFFERS_REMOTE_CONFIG
    | ServerCapabilities.ACCEPTS_EFFECTIVE_CONFIG
)


def echo_reply(message: pb.AgentToServer) -> pb.ServerToAgent:
    return pb.ServerToAgent(instance_uid=message.instance_uid, capabilities=SERVER_CAPABILITIES)


class _Recorder:
    """What both fakes share: the received messages, in order, a queue to await them, and
    `async with` around `start()`/`stop()`."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.messages: list[pb.AgentToServer] = []
        self._arrivals: asyncio.Queue[pb.AgentToServer] = asyncio.Queue()

    def _record(self, message: pb.AgentToServer) -> pb.ServerToAgent | None:
        self.messages.append(message)
        self._arrivals.put_nowait(message)
        return self.responder(message)

    async def start(self) -> Self:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def next_message(self, timeout: float = 2.0) -> pb.AgentToServer:
        """The next message not yet taken, waiting for it up to `timeout` seconds."""
        async with asyncio.timeout(timeout):
            return await self._arrivals.get()

    async def next_matching(
        self, predicate: Callable[[pb.AgentToServer], bool], timeout: float = 2.0
    ) -> pb.AgentToServer:
        """Skip messages until one satisfies `predicate`."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self._arrivals.get()
                if predicate(message):
                    return message


class FakeWebSocketServer(_Recorder):
    """A WebSocket OpAMP server; `push()` sends a ServerToAgent at any time."""

    def __init__(
        self,
        responder: Responder = echo_reply,
        *,
        process_request: Callable[[ServerConnection, Request], Response | None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(responder)
        self.process_request = process_request
        self.ssl_context = ssl_context
        self.peer_certificates: list[bytes | None] = []
        self.frames: list[bytes] = []
        self.connection_times: list[float] = []
        self.request_headers: list[dict[str, str]] = []
        self.closed = asyncio.Event()
        self._connection: ServerConnection | None = None
        self._server: Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{OPAMP_PATH}"

    async def start(self) -> Self:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            compression=None,
            process_request=self.process_request,
            max_size=None,
            ssl=self.ssl_context,
        )
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def push(self, reply: pb.ServerToAgent) -> None:
        """Send `reply` on the most recent connection, unprompted."""
        assert self._connection is not None, "no agent connected"
        await self._connection.send(encode_ws_frame(reply))

    async def drop_connection(self) -> None:
        """Close the current connection as a restarting server would."""
        if self._connection is not None:
            await self._connection.close(code=1001, reason="going away")

    async def _handle(self, connection: ServerConnection) -> None:
        self.connection_times.append(time.monotonic())
        if self.ssl_context is not None:
            self.peer_certificates.append(_peer_certificate(connection.transport.get_extra_info("ssl_object")))
        if connection.request is not None:
            self.request_headers.append(dict(connection.request.headers.raw_items()))
        self._connection = connection
        self.closed.clear()
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    await connection.close(code=1003, reason="binary frames only")
                    return
                self.frames.append(frame)
                reply = self._record(decode_agent_ws_frame(frame))
                if reply is not None:
                    await connection.send(encode_ws_frame(reply))
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()


def _peer_certificate(ssl_object: ssl.SSLObject | None) -> bytes | None:
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


class FakeHttpServer(_Recorder):
    """A plain-HTTP OpAMP server (HTTP/1.1 with keep-alive, just enough for httpx).

    `intercept(request)` may answer a request before it is decoded (e.g. a 503 with
    Retry-After); replies are gzipped when the request accepts gzip and `gzip_responses`.
    """

    def __init__(
        self,
        responder: Responder = echo_reply,
        *,
        intercept: Callable[[HttpRequest], HttpResponse | None] | None = None,
        gzip_responses: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(responder)
        self.intercept = intercept
        self.ssl_context = ssl_context
        self.peer_certificates: list[bytes | None] = []
        self.gzip_responses = gzip_responses
        self.requests: list[HttpRequest] = []
        self.request_times: list[float] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{OPAMP_PATH}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0, ssl=self.ssl_context)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Closing the sockets ends each handler at its next read; waiting for them keeps
            # the loop from cancelling them mid-read at shutdown.
            for writer in list(self._writers):
                writer.close()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.ssl_context is not None:
            self.peer_certificates.append(_peer_certificate(writer.get_extra_info("ssl_object")))
        if (task := asyncio.current_task()) is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            while (request := await self._read_request(reader)) is not None:
                self.requests.append(request)
                self.request_times.append(time.monotonic())
                writer.write(self._respond(request).encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
        request_line = await reader.readline()
        if not request_line.strip():
            return None
        method, path, _ = request_line.decode("latin-1").split(" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return HttpRequest(method=method, path=path, headers=headers, body=body)

    def _respond(self, request: HttpRequest) -> HttpResponse:
        if self.intercept is not None and (response := self.intercept(request)) is not None:
            return response
        if request.method != "POST" or request.path != OPAMP_PATH:
            return HttpResponse(HTTPStatus.NOT_FOUND)
        try:
            message = decode_agent_to_server(request.body)
        except FrameError as error:
            return HttpResponse(HTTPStatus.BAD_REQUEST, body=str(error).encode())
        reply = self._record(message)
        if reply is None:
            reply = pb.ServerToAgent(instance_uid=message.instance_uid)
        body = reply.SerializeToString()
        headers = {"Content-Type": "application/x-protobuf"}
        if self.gzip_responses and "gzip" in request.headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return HttpResponse(HTTPStatus.OK, headers, body)
