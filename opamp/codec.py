"""WebSocket frame codec for OpAMP.

Every OpAMP WebSocket message is a varint header followed by protobuf bytes. The only
header defined is 0 (a single 0x00 byte). Clients written before the header existed send
the protobuf alone; since a non-empty serialized AgentToServer never starts with 0x00
(field numbers start at 1, so no valid tag byte is zero), a decoder can tell the two apart.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError

from opamp.proto import opamp_pb2

WS_HEADER = b"\x00"
_MAX_VARINT_BYTES = 10

_Message = TypeVar("_Message", opamp_pb2.AgentToServer, opamp_pb2.ServerToAgent)


class FrameError(ValueError):
    """A frame that is not a valid OpAMP message; the message is safe to show the peer."""


def encode_ws_frame(message: opamp_pb2.ServerToAgent | opamp_pb2.AgentToServer) -> bytes:
    """Header byte 0 + serialized message."""
    return WS_HEADER + bytes(message.SerializeToString())


def _read_varint(data: bytes) -> int:
    value = 0
    for index, byte in enumerate(data[:_MAX_VARINT_BYTES]):
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value
    raise FrameError("truncated WebSocket frame header")


def _parse(message: _Message, payload: bytes) -> _Message:
    """`payload` parsed into the empty `message`, or FrameError naming the message type."""
    try:
        message.ParseFromString(payload)
    except (DecodeError, RecursionError) as error:
        raise FrameError(f"undecodable {message.DESCRIPTOR.name}: {error or 'malformed protobuf'}") from None
    return message


def decode_agent_to_server(payload: bytes) -> opamp_pb2.AgentToServer:
    """Parse protobuf bytes into an AgentToServer or raise FrameError with a clear reason."""
    return _parse(opamp_pb2.AgentToServer(), payload)


def decode_agent_ws_frame(frame: bytes) -> opamp_pb2.AgentToServer:
    """Header check + protobuf decode of one agent WebSocket frame.

    A frame whose first byte is not 0 is accepted only when the whole frame parses as an
    AgentToServer (a legacy client without the header); otherwise it is a non-zero
    header, which this protocol version does not define.
    """
    if not frame:
        return opamp_pb2.AgentToServer()
    if frame[0] == 0:
        return decode_agent_to_server(frame[1:])
    try:
        return decode_agent_to_server(frame)
    except FrameError:
        header = _read_varint(frame)
        raise FrameError(f"unsupported WebSocket frame header {header}: only 0 is defined") from None


def decode_server_to_agent(payload: bytes) -> opamp_pb2.ServerToAgent:
    return _parse(opamp_pb2.ServerToAgent(), payload)


def decode_server_ws_frame(frame: bytes) -> opamp_pb2.ServerToAgent:
    """Header check + protobuf decode of one server WebSocket frame (agent side)."""
    if not frame:
        return opamp_pb2.ServerToAgent()
    if frame[0] != 0:
        raise FrameError(f"unsupported WebSocket frame header byte {frame[0]}: only 0 is defined")
    return decode_server_to_agent(frame[1:])
