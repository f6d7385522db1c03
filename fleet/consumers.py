"""The OpAMP WebSocket transport: binary frames with a 0x00 header, one agent per socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from fleet.connection import authenticate, connection_info
from fleet.credentials import CredentialRefused
from fleet.hints import hint_stream
from fleet.protocol_errors import error_reply
from fleet.session import AgentSession
from fleet.session_runtime import runtime
from opamp.codec import FrameError, decode_agent_ws_frame, encode_ws_frame
from opamp.proto import opamp_pb2

logger = logging.getLogger(__name__)

# Close codes. daphne (autobahn) lets a server send only 1000 or 3000-4999, so the
# standard 1003 / 1009 / 1008 are carried in the application range as 4000 + their number.
CLOSE_UNSUPPORTED_DATA = 4003  # a text frame on the binary OpAMP socket
CLOSE_MESSAGE_TOO_BIG = 4009
CLOSE_CREDENTIAL_REVOKED = 4008  # the connection's client certificate was revoked
# No message in time (opamp_site/server.py closes the socket: OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS
# after the accept, then the offline timeout): 4000 + 408, as the HTTP transport answers a late body.
CLOSE_TIMED_OUT = 4408


class OpampConsumer(AsyncWebsocketConsumer):
    """Thin: size check and decode, one session call, encode. The session decides.

    Hints reach it through its process's hint stream (fleet.hints), never through a
    channel-layer channel of its own.
    """

    session: AgentSession
    # Frames and hints of one socket are handled one at a time, as Channels' own dispatch
    # loop would: a push never interleaves with the reply to a frame.
    _turn: asyncio.Lock

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' `AsyncConsumer.__call__` without the channel layer: that one asks the
        layer for a channel per socket (`new_channel()`: a Redis subscription on the
        PubSub layer, unsubscribed again when the socket closes) and keeps a second
        receive task on it. One socket's only source is its ASGI `receive`."""
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def dispatch(self, message: dict[str, object]) -> None:
        """Channels' dispatch without its `aclose_old_connections()` before every handler.

        That call hops to Channels' one sync thread for every frame and every hint: at
        9,000 agents per process it was 13% of the process's CPU, and it queued every
        message behind the others in that thread. These handlers reach the database only
        through `fleet.db.db()`, which closes stale connections around each call itself.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']!r}")
        await handler(message)

    async def connect(self) -> None:
        try:
            info = connection_info(self.scope)
            credential = await authenticate(info, runtime().credentials)
        except CredentialRefused as error:
            # Closing before accept refuses the handshake (daphne answers 403; ASGI servers
            # cannot send 401 on a WebSocket upgrade). The reason goes to the log only.
            logger.info("refused a WebSocket from %s: %s", self.scope.get("client"), error.message)
            # Raised in a database thread, its traceback holds the frames that hold the
            # future that holds it: a cycle per refused handshake, left to the collector.
            error.__traceback__ = None
            await self.close()
            return
        await hint_stream().start()
        self._turn = asyncio.Lock()
        self.session = AgentSession(
            transport="websocket", remote_address=info.agent_address, credential=credential, endpoint=info.endpoint
        )
        self.session.on_superseded = self._close_superseded
        self.session.hint_receiver = self
        await self.accept()

    def _close_superseded(self) -> None:
        # Called synchronously from the session of the newer connection, in another
        # consumer's task; scheduling the close keeps that call non-blocking.
        self._close_task = asyncio.ensure_future(self.close_unless_gone())

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if bytes_data is None:
            logger.info("closing %s: text frame on the OpAMP socket", self.session.remote_address)
            await self.close(code=CLOSE_UNSUPPORTED_DATA)
            return
        if len(bytes_data) > settings.OPAMP_MAX_MESSAGE_BYTES:
            logger.info("closing %s: %d-byte frame over the limit", self.session.remote_address, len(bytes_data))
            await self.close(code=CLOSE_MESSAGE_TOO_BIG)
            return
        try:
            message = decode_agent_ws_frame(bytes_data)
        except FrameError as error:
            await self.send_message(error_reply(instance_uid=b"", message=str(error)))
            return
        async with self._turn:
            reply = await self.session.handle(message)
            await self.send_message(reply)
            self._close_when_unavailable(reply)

    def _close_when_unavailable(self, reply: opamp_pb2.ServerToAgent) -> None:
        """Admission refused (fleet.admission): close the socket once retry_info has passed.

        agent_client closes at once and comes back after retry_info; opamp-go's client only
        logs the error and reconnects as soon as the socket closes, so the socket is kept
        (idle, with no work per message) until the agent should come back.
        """
        pending = getattr(self, "_unavailable_close", None)
        if not reply.HasField("error_response") or (
            reply.error_response.type != opamp_pb2.ServerErrorResponseType_Unavailable
        ):
            if pending is not None:
                pending.cancel()  # admitted on a later message of the same socket
                self._unavailable_close = None
            return
        if pending is None:
            delay = reply.error_response.retry_info.retry_after_nanoseconds / 1e9
            self._unavailable_close = asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.ensure_future(self.close_unless_gone())
            )

    async def close_unless_gone(self) -> None:
        """A close scheduled outside the consumer's own turn (a takeover, a refused agent's
        delay) can find the agent already gone: its disconnect is still queued behind.
        Servers answer a send on a closed connection with an OSError (ASGI; uvicorn's
        ClientDisconnected; daphne drops it), and nobody awaits this task to see it."""
        with contextlib.suppress(OSError):
            await self.close(code=1000)

    async def hinted(self, kind: str, generation: int | None) -> None:
        """Hint: something of the agent changed (`kind` says what); push what is due now."""
        async with self._turn:
            reply = await self.session.push_on_hint(kind, generation)
            if reply is None:
                return
            try:
                await self.send_message(reply)
            except Exception:
                # The socket closed while the push was being prepared; the agent gets the
                # same offer on its next connection.
                logger.debug("push to %s dropped: connection closed", self.session.remote_address)

    async def credentials_revoked(self) -> None:
        """Hint: a certificate of this agent was revoked; drop the socket if it was ours."""
        async with self._turn:
            if await self.session.credential_revoked():
                logger.info("closing %s: its client certificate was revoked", self.session.remote_address)
                await self.close(code=CLOSE_CREDENTIAL_REVOKED)

    async def send_message(self, reply: opamp_pb2.ServerToAgent) -> None:
        await self.send(bytes_data=encode_ws_frame(reply))

    async def disconnect(self, code: int) -> None:
        pending = getattr(self, "_unavailable_close", None)
        if pending is not None:
            pending.cancel()
        session = getattr(self, "session", None)  # absent when the handshake was refused
        if session is not None:
            await session.close()
