"""daphne, with bounds on what one client can make a server process hold.

    python -m opamp_site.server --server daphne -b 127.0.0.1 -p 4320 opamp_site.asgi:application

Takes daphne's command line. What stock daphne leaves open, and what this changes:

- Request bodies. Twisted receives a whole body (spooled to a temporary file past 100 kB)
  before daphne starts the application, and daphne then queues all of it for the
  application at once, so a refused 60 MiB POST cost 60 MiB of memory. Here the
  application starts as soon as the headers are in, and the body streams to it: at most
  BODY_HIGH_WATER bytes wait for the application, then the socket is not read until it
  catches up. The OpAMP transport answers 401/413 from the headers; what it did not read
  is discarded as it arrives, so a sender that writes its whole body before reading the
  answer still gets the answer, and the connection is closed after it.
- Timeouts: the headers of a request must arrive within OPAMP_HTTP_HEADER_TIMEOUT_SECONDS of
  its first byte (or of the connection), its body within OPAMP_HTTP_BODY_TIMEOUT_SECONDS of
  the headers; else 408 and the connection is closed. (Twisted's own timeout is an idle
  timeout, reset by every byte, so a trickle never hit it.)
- WebSocket silence: a socket must send its first message within
  OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS of its accept, and then one at least every offline
  timeout (OPAMP_HEARTBEAT_INTERVAL_SECONDS x OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS); else
  it is closed with CLOSE_TIMED_OUT. Counted from a message's arrival here, not from when
  the consumer gets to it, so a backlog under load never closes a talking agent.
- WebSocket messages: daphne's 1 MiB default, enforced by dropping the connection, becomes
  OPAMP_MAX_MESSAGE_BYTES (the HTTP transport's limit), and a message over it is answered
  with the close code the consumer uses (CLOSE_MESSAGE_TOO_BIG). The command line cannot set
  another: one setting for both transports.

Behind nginx (deploy/) the same limits are applied there first (client_max_body_size,
client_header_timeout, client_body_timeout); these hold for the embedded default, which
has nothing in front.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial
from io import BytesIO
from typing import Any

import daphne.server as daphne_server  # first: installs Twisted's asyncio reactor
from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from django.conf import settings
from twisted.internet import reactor
from twisted.web import http

from opamp_site.server_bounds import BODY_TIMED_OUT, HEADERS_TIMED_OUT, timeout_response

# How much of a request body may wait for the application before the socket is paused,
# and how little before it is read again.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024

logger = logging.getLogger(__name__)


class BoundedChannel(http.HTTPChannel):
    """One HTTP/1.1 connection; the headers of each request must arrive in time."""

    header_timeout: float = 0.0
    _header_timer: Any = None
    _awaiting_headers = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_header_timer()

    def dataReceived(self, data: bytes) -> None:
        # A kept-alive connection waits for its next request under Twisted's idle timeout;
        # the header clock starts at that request's first byte.
        if self._awaiting_headers and self._header_timer is None:
            self._start_header_timer()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        super().allHeadersReceived()

    def requestDone(self, request: http.Request) -> None:
        self._awaiting_headers = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_header_timer()
        super().connectionLost(reason)

    def _start_header_timer(self) -> None:
        if self.header_timeout > 0:
            self._header_timer = reactor.callLater(self.header_timeout, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport is not None:
            self.transport.write(timeout_response(HEADERS_TIMED_OUT))
            self.loseConnection()


class BoundedRequest(WebRequest):
    """A plain-HTTP request whose application starts at the headers and reads the body as
    it streams in. WebSocket upgrades take daphne's path unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted would read a whole multipart/form-data body into memory to parse it for
        # its own resources; the application parses bodies itself.
        self._parsePOSTFormSubmission = False
        self.streaming = False
        self.body_complete = False
        self.discarding = False  # the response is complete: the rest of the body is dropped
        self.finish_pending = False
        self.buffered = 0
        self.paused = False
        self.body_timer: Any = None

    # --- Twisted's request lifecycle -----------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        """All headers are in (Twisted calls this before the first byte of the body)."""
        if self.requestHeaders.hasHeader(b"upgrade"):
            super().gotLength(length)
            return
        channel = self.channel
        # What Twisted's requestReceived would fill in once the body is complete; daphne's
        # process() builds the ASGI scope from it.
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self.args = {}
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.content = BytesIO()  # daphne's process() looks at it; the body never goes there
        self.streaming = True
        if length != 0 and self.server.http_body_timeout > 0:
            self.body_timer = reactor.callLater(self.server.http_body_timeout, self._body_timed_out)
        self.process()

    def handleContentChunk(self, data: bytes) -> None:
        if not self.streaming:
            super().handleContentChunk(data)
            return
        if self.discarding or self.application_queue is None:
            return
        self.buffered += len(data)
        self.application_queue.put_body(data, more_body=True)
        if self.buffered > BODY_HIGH_WATER and not self.paused:
            self.paused = True
            self.channel._networkProducer.pauseProducing()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The whole body is in."""
        if not self.streaming:
            super().requestReceived(command, path, version)
            return
        self.body_complete = True
        self._cancel_body_timer()
        if self.finish_pending:
            self.finish_pending = False
            super().finish()
        elif self.application_queue is not None and not self.discarding:
            self.application_queue.put_body(b"", more_body=False)

    def body_consumed(self, size: int) -> None:
        """The application took `size` bytes of body off its queue."""
        self.buffered -= size
        if self.paused and self.buffered < BODY_LOW_WATER:
            self._resume_reading()

    def _resume_reading(self) -> None:
        self.paused = False
        channel = getattr(self, "channel", None)  # Twisted deletes it once the request is done
        if channel is not None and channel.transport is not None:
            channel._networkProducer.resumeProducing()

    # --- Responses that complete before the body ------------------------------------------

    def handle_reply(self, message: dict[str, Any]) -> None:
        if self.streaming and not self.body_complete and message.get("type") == "http.response.start":
            # The rest of this request's body will not be parsed as the next request.
            self.channel.persistent = False
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        super().handle_reply(message)

    def finish(self) -> None:
        if self.streaming and not self.body_complete and not self._disconnected:
            # Send the answer now; Twisted's finish, which hands the connection on to the
            # next request, waits until the body is in (or the body timeout closes it).
            if self.chunked:
                self.channel.write(b"0\r\n\r\n")
                self.chunked = 0
            self.finish_pending = True
            self.discarding = True
            if self.paused:
                self._resume_reading()
            return
        super().finish()

    def check_timeouts(self) -> None:
        if not self.finish_pending:
            super().check_timeouts()

    def _body_timed_out(self) -> None:
        self.body_timer = None
        if self.body_complete or self._disconnected or getattr(self, "channel", None) is None:
            return
        if not self._response_started:
            self.handle_reply(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            self.handle_reply({"type": "http.response.body", "body": BODY_TIMED_OUT})
        self.channel.loseConnection()

    def _cancel_body_timer(self) -> None:
        if self.body_timer is not None and self.body_timer.active():
            self.body_timer.cancel()
        self.body_timer = None

    def connectionLost(self, reason: Any) -> None:
        self._cancel_body_timer()
        super().connectionLost(reason)


class StreamedRequestEvents(asyncio.Queue):
    """The application's receive queue for a streamed request.

    Body chunks arrive through put_body() as the socket delivers them; taking one off
    lets the request read more. daphne's process() also puts the (empty) spooled body
    here: that is dropped.
    """

    def __init__(self, request: BoundedRequest) -> None:
        super().__init__()
        self.request = request

    def put_nowait(self, item: dict[str, Any]) -> None:
        if item.get("type") == "http.request":
            return
        super().put_nowait(item)

    def put_body(self, body: bytes, *, more_body: bool) -> None:
        super().put_nowait({"type": "http.request", "body": body, "more_body": more_body})

    async def get(self) -> dict[str, Any]:
        event = await super().get()
        if event.get("type") == "http.request":
            self.request.body_consumed(len(event["body"]))
        return event


class BoundedHTTPFactory(HTTPFactory):
    def __init__(self, server: OpampServer) -> None:
        super().__init__(server)
        self.header_timeout = server.http_header_timeout

    def protocol(self) -> Any:
        # Twisted's _genericHTTPChannelProtocolFactory, with our channel inside.
        channel = BoundedChannel()
        channel.header_timeout = self.header_timeout
        return http._GenericHTTPChannelProtocol(channel)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BoundedRequest
        return protocol


class BoundedWebSocketProtocol(WebSocketProtocol):
    _last_message: float | None = None
    _silence_call: Any = None

    def onOpen(self) -> None:
        super().onOpen()
        self._watch_silence(self.server.ws_first_message_timeout)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._last_message = time.monotonic()
        if self._silence_call is None and self.server.ws_idle_timeout > 0:
            self._watch_silence(self.server.ws_idle_timeout)  # no first-message bound was set
        super().onMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._silence_call is not None and self._silence_call.active():
            self._silence_call.cancel()
        self._silence_call = None
        super().onClose(wasClean, code, reason)

    def _watch_silence(self, seconds: float) -> None:
        # One timer per socket, moved on only when it fires: a message costs a timestamp.
        self._silence_call = reactor.callLater(seconds, self._check_silence) if seconds > 0 else None

    def _check_silence(self) -> None:
        self._silence_call = None
        if self.state != self.STATE_OPEN:
            return
        if self._last_message is not None:
            idle = self.server.ws_idle_timeout
            if idle <= 0:
                return
            remaining = self._last_message + idle - time.monotonic()
            if remaining > 0:
                self._watch_silence(remaining)
                return
        from fleet.consumers import CLOSE_TIMED_OUT  # (this module loads before Django is set up)

        logger.info("closing the WebSocket of %s: no message in time", self.client_addr)
        self.serverClose(code=CLOSE_TIMED_OUT)

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # autobahn drops the TCP connection without a word (failByDrop); say why, with the
        # code the consumer uses for the same refusal. Frames still arriving are skipped.
        # (Imported here: this module is loaded before Django is set up.)
        from fleet.consumers import CLOSE_MESSAGE_TOO_BIG

        self.failByDrop = False
        self._fail_connection(CLOSE_MESSAGE_TOO_BIG, f"message larger than {max_msg_size} bytes")


class BoundedWebSocketFactory(WebSocketFactory):
    protocol = BoundedWebSocketProtocol


class OpampServer(daphne_server.Server):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The WebSocket limits are the OpAMP message limit, whatever the command line said.
        kwargs["websocket_max_message_size"] = settings.OPAMP_MAX_MESSAGE_BYTES
        kwargs["websocket_max_frame_size"] = settings.OPAMP_MAX_MESSAGE_BYTES
        super().__init__(*args, **kwargs)
        self.http_header_timeout = float(settings.OPAMP_HTTP_HEADER_TIMEOUT_SECONDS)
        self.http_body_timeout = float(settings.OPAMP_HTTP_BODY_TIMEOUT_SECONDS)
        self.ws_first_message_timeout = float(settings.OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS)
        # The offline timeout: by then the agent is shown offline anyway.
        self.ws_idle_timeout = float(
            settings.OPAMP_HEARTBEAT_INTERVAL_SECONDS * settings.OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS
        )

    def run(self) -> None:
        # Server.run() builds its two factories from these names of daphne.server, then
        # blocks in the reactor for the life of the process.
        daphne_server.HTTPFactory = BoundedHTTPFactory
        daphne_server.WebSocketFactory = BoundedWebSocketFactory
        super().run()

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> asyncio.Queue | None:
        """daphne's, with a streamed request's own queue."""
        assert "application_instance" not in self.connections[protocol]
        streamed = isinstance(protocol, BoundedRequest) and protocol.streaming
        input_queue: asyncio.Queue = StreamedRequestEvents(protocol) if streamed else asyncio.Queue()
        scope.setdefault("asgi", {"version": "3.0"})
        application_instance = self.application(
            scope=scope, receive=input_queue.get, send=partial(self.handle_reply, protocol)
        )
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop()
        )
        return input_queue


class OpampCommandLine(CommandLineInterface):
    description = "OpAMP control plane server (daphne, bounded)"
    server_class = OpampServer


def main(argv: Sequence[str]) -> None:
    OpampCommandLine().run(list(argv))
