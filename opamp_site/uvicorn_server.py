"""uvicorn (httptools, uvloop, websockets' sans-I/O protocol) with the bounds of the daphne server.

    python -m opamp_site.server --server uvicorn -b 127.0.0.1 -p 4320 opamp_site.asgi:application

The same Channels application, the same command line as the daphne server
(opamp_site/daphne_server.py) for what this project uses of it, and the same bounds on what
one client can make a server process hold:

- Request bodies stream to the application (uvicorn's own flow control: reading pauses past
  64 KiB that the application has not taken). An answer sent before the whole body is in
  says `connection: close`; the rest of the body is read and discarded, then the connection
  is closed, so a sender that writes its whole body before reading still gets the answer
  (closing at once would reset the connection under its unread bytes).
- Timeouts: a request's headers within OPAMP_HTTP_HEADER_TIMEOUT_SECONDS of its first byte
  (or of the connection), its body within OPAMP_HTTP_BODY_TIMEOUT_SECONDS of the headers;
  else 408 and the connection is closed. (uvicorn has no header or body timeout.)
- WebSocket silence: the first message within OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS of the
  accept, then one at least every offline timeout, counted from a message's arrival here;
  else CLOSE_TIMED_OUT.
- WebSocket messages: at most OPAMP_MAX_MESSAGE_BYTES, refused from the frame header with
  the consumer's CLOSE_MESSAGE_TOO_BIG (websockets would say 1009); the rest is discarded and
  the connection closed once the client has gone quiet.
- A handshake the application has not accepted within `--websocket_connect_timeout` is
  refused (503), as daphne does.
- Proxy headers are off unless `--proxy-headers` is given (uvicorn trusts X-Forwarded-For
  from loopback by default; behind nginx the peer address must stay nginx's for the
  application's trusted-proxy check).
- SIGTERM: stop accepting, close WebSockets with 1012 (agents reconnect elsewhere), wait
  at most GRACEFUL_SHUTDOWN_SECONDS for requests in flight.

Per-message deflate is off, as under daphne: agents' frames are small protobufs, and a
compressor per socket costs memory on every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import uvicorn
from django.conf import settings
from uvicorn.importer import import_from_string
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Close, Frame, Opcode

from opamp_site.server_bounds import BODY_TIMED_OUT, HEADERS_TIMED_OUT, timeout_response

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 10
# What an idle kept-alive HTTP connection is given for its next request (uvicorn's default
# is 5 s; the header timeout bounds a request once its first byte arrives).
KEEP_ALIVE_SECONDS = 15
# After refusing an oversized WebSocket message: how long the client must have sent nothing
# before the connection is closed (its close reply comes after the rest of the message).
QUIET_BEFORE_CLOSE_SECONDS = 1.0


class _DeferredClose:
    """The transport as a request's response cycle sees it: a close asked for while the
    request body is still arriving waits until the body is in (or its timeout fires)."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, protocol: BoundedHttpProtocol, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport

    def close(self) -> None:
        if self._protocol.body_pending:
            self._protocol.close_when_body_done = True
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedCycle(RequestResponseCycle):
    """uvicorn's response cycle; an answer that starts before the body is in closes the
    connection after it, so the unread rest is never taken for the next request."""

    protocol: BoundedHttpProtocol

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started and self.protocol.body_pending:
            self.keep_alive = False
        await super().send(message)


class BoundedHttpProtocol(HttpToolsProtocol):
    header_timer: asyncio.TimerHandle | None = None
    body_timer: asyncio.TimerHandle | None = None
    body_pending = False  # headers in, body not yet complete
    close_when_body_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The socket now belongs to the WebSocket protocol and this one is never called
        # again, nor told the connection is lost, where uvicorn drops the parser that points
        # back at it: dropped here, so this protocol (transport, parser, flow control, ~28
        # objects) is freed now, not left as a cycle per WebSocket for the collector.
        self.parser = None  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A kept-alive connection waits for its next request under the keep-alive timeout;
        # the header clock starts at that request's first byte.
        if self.header_timer is None:
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        cycle = self.cycle
        # The cycle uvicorn made, with the two behaviours above (no state of its own).
        cycle.__class__ = BoundedCycle
        cycle.protocol = self  # type: ignore[attr-defined]
        cycle.transport = _DeferredClose(self, self.transport)  # type: ignore[assignment]
        if self._has_body():
            self.body_pending = True
            timeout = float(settings.OPAMP_HTTP_BODY_TIMEOUT_SECONDS)
            if timeout > 0:
                self.body_timer = self.loop.call_later(timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._body_done()
        super().on_message_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() != b"0"
            if name == b"transfer-encoding":
                return True
        return False

    def _body_done(self) -> None:
        self.body_pending = False
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if self.close_when_body_done:
            self.close_when_body_done = False
            self.transport.close()

    def _start_header_timer(self) -> None:
        timeout = float(settings.OPAMP_HTTP_HEADER_TIMEOUT_SECONDS)
        if timeout > 0:
            self.header_timer = self.loop.call_later(timeout, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _headers_timed_out(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.write(timeout_response(HEADERS_TIMED_OUT))
            self.transport.close()

    def _body_timed_out(self) -> None:
        self.body_timer = None
        self.body_pending = False
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(timeout_response(BODY_TIMED_OUT))
        if cycle is not None:
            # The application's next receive() says the client is gone; its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    last_message: float | None = None
    silence_timer: asyncio.TimerHandle | None = None
    accept_timer: asyncio.TimerHandle | None = None
    quiet_timer: asyncio.TimerHandle | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        timeout = float(self.config.websocket_connect_timeout)  # type: ignore[attr-defined]
        if not self.handshake_complete and timeout > 0:
            self.accept_timer = self.loop.call_later(timeout, self._not_accepted_in_time)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and not self.close_sent:
            self._cancel_accept_timer()
            # The handshake's request and response are not read again; kept, they held
            # 1.4 KiB of every connection for its whole life.
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
            self._watch_silence(float(settings.OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS))

    def send_receive_event_to_app(self) -> None:
        self.last_message = time.monotonic()
        if self.silence_timer is None:
            self._watch_silence(_idle_timeout())  # no first-message bound was set
        super().send_receive_event_to_app()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_accept_timer()
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
        if self.silence_timer is not None:
            self.silence_timer.cancel()
            self.silence_timer = None
        super().connection_lost(exc)

    def handle_parser_exception(self) -> None:
        # Called again for every read once the parser has failed.
        if self.close_sent:
            if self.quiet_timer is not None:
                self._close_when_quiet()  # the rest of a refused message, being discarded
            return
        if not isinstance(self.conn.parser_exc, PayloadTooBig):
            super().handle_parser_exception()
            return
        # websockets queued a 1009 close: send the consumer's code for the same refusal,
        # drop what the client still sends (the rest of its message, its close reply) and
        # close once it has gone quiet. Closing at once would reset the connection under its
        # unread bytes, and the close frame with it; the client waits for our close before
        # it reports the code.
        from fleet.consumers import CLOSE_MESSAGE_TOO_BIG  # (this module loads before Django is set up)

        self.conn.data_to_send()
        reason = f"message larger than {self.config.ws_max_size} bytes"
        close = Frame(Opcode.CLOSE, Close(CLOSE_MESSAGE_TOO_BIG, reason).serialize())
        self.transport.write(close.serialize(mask=False))
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_MESSAGE_TOO_BIG, "reason": reason})
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self._close_when_quiet()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def _close_when_quiet(self) -> None:
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
        self.quiet_timer = self.loop.call_later(QUIET_BEFORE_CLOSE_SECONDS, self.transport.close)

    def _not_accepted_in_time(self) -> None:
        self.accept_timer = None
        if self.handshake_complete or self.transport.is_closing():
            return
        self.handshake_complete = True
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self.conn.send_response(self.conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "not accepted in time\n"))
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def _cancel_accept_timer(self) -> None:
        if self.accept_timer is not None:
            self.accept_timer.cancel()
            self.accept_timer = None

    def _watch_silence(self, seconds: float) -> None:
        # One timer per socket, moved on only when it fires: a message costs a timestamp.
        self.silence_timer = self.loop.call_later(seconds, self._check_silence) if seconds > 0 else None

    def _check_silence(self) -> None:
        self.silence_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        if self.last_message is not None:
            idle = _idle_timeout()
            if idle <= 0:
                return
            remaining = self.last_message + idle - time.monotonic()
            if remaining > 0:
                self._watch_silence(remaining)
                return
        from fleet.consumers import CLOSE_TIMED_OUT  # (this module loads before Django is set up)

        logger.info("closing the WebSocket of %s: no message in time", self.client)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_TIMED_OUT, "reason": ""})
        self.conn.send_close(CLOSE_TIMED_OUT)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)


def _idle_timeout() -> float:
    """The offline timeout: by then the agent is shown offline anyway."""
    return float(settings.OPAMP_HEARTBEAT_INTERVAL_SECONDS * settings.OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS)


def build_parser() -> argparse.ArgumentParser:
    """The part of daphne's command line this project uses, with daphne's defaults."""
    parser = argparse.ArgumentParser(description="OpAMP control plane server (uvicorn, bounded)")
    parser.add_argument("-b", "--bind", dest="host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("--fd", type=int, help="serve on this already bound socket (systemd socket activation)")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--ping-timeout", type=float, default=30.0)
    parser.add_argument("--websocket_connect_timeout", type=float, default=5.0)
    parser.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-For from loopback")
    parser.add_argument("application", help="the ASGI application, module:attribute")
    return parser


def build_config(options: argparse.Namespace) -> uvicorn.Config:
    # Imported here, not by uvicorn later: it sets Django up, which the settings below need.
    application = import_from_string(options.application)
    config = uvicorn.Config(
        application,
        host=options.host,
        port=options.port,
        fd=options.fd,
        loop="uvloop",
        http=BoundedHttpProtocol,
        ws=BoundedWebSocketProtocol,
        ws_max_size=int(settings.OPAMP_MAX_MESSAGE_BYTES),
        ws_ping_interval=options.ping_interval,
        ws_ping_timeout=options.ping_timeout,
        ws_per_message_deflate=False,
        lifespan="off",
        # Django configures logging when the application loads (settings.LOGGING); an access
        # line per request and WebSocket, as daphne writes by default.
        log_config=None,
        access_log=True,
        proxy_headers=options.proxy_headers,
        forwarded_allow_ips="127.0.0.1" if options.proxy_headers else None,
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    config.websocket_connect_timeout = options.websocket_connect_timeout  # type: ignore[attr-defined]
    return config


def main(argv: Sequence[str]) -> None:
    options = build_parser().parse_args(argv)
    uvicorn.Server(build_config(options)).run()
