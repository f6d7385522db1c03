"""How the session refuses a message: ProtocolError, and the reply that says why."""

from __future__ import annotations

from opamp.proto import opamp_pb2


class ProtocolError(ValueError):
    """A well-formed protobuf that breaks a protocol rule; answered with BadRequest."""


def error_reply(
    *, instance_uid: bytes, message: str, retry_after_seconds: float | None = None
) -> opamp_pb2.ServerToAgent:
    """A ServerToAgent carrying only error_response (the spec forbids anything else beside it)."""
    reply = opamp_pb2.ServerToAgent(instance_uid=instance_uid)
    if retry_after_seconds is None:
        reply.error_response.type = opamp_pb2.ServerErrorResponseType_BadRequest
    else:
        reply.error_response.type = opamp_pb2.ServerErrorResponseType_Unavailable
        reply.error_response.retry_info.retry_after_nanoseconds = int(retry_after_seconds * 1e9)
    reply.error_response.error_message = message
    return reply
