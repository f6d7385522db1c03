from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opamp.codec import (
    FrameError,
    decode_agent_to_server,
    decode_agent_ws_frame,
    decode_server_ws_frame,
    encode_ws_frame,
)
from opamp.proto import opamp_pb2

UID = bytes(range(1, 17))


def test_an_encoded_frame_starts_with_the_zero_header_byte():
    frame = encode_ws_frame(opamp_pb2.ServerToAgent(instance_uid=UID))
    assert frame[0] == 0
    assert decode_server_ws_frame(frame).instance_uid == UID


def test_a_frame_with_the_zero_header_decodes():
    message = opamp_pb2.AgentToServer(instance_uid=UID, sequence_num=7)
    assert decode_agent_ws_frame(encode_ws_frame(message)) == message


def test_a_legacy_frame_without_header_decodes():
    message = opamp_pb2.AgentToServer(instance_uid=UID, sequence_num=7, capabilities=1)
    assert decode_agent_ws_frame(message.SerializeToString()) == message


@pytest.mark.parametrize("header", [b"\x01", b"\x02", b"\x05", b"\x80\x01"])
def test_a_non_zero_header_is_rejected_with_a_clear_reason(header: bytes):
    payload = opamp_pb2.AgentToServer(instance_uid=UID).SerializeToString()
    with pytest.raises(FrameError, match="only 0 is defined"):
        decode_agent_ws_frame(header + payload)


def test_a_truncated_message_is_rejected():
    payload = opamp_pb2.AgentToServer(instance_uid=UID, sequence_num=3).SerializeToString()
    with pytest.raises(FrameError, match="undecodable AgentToServer"):
        decode_agent_to_server(payload[:-3])


def test_a_field_with_the_wrong_wire_type_is_read_as_absent():
    # Protobuf keeps a known field number with the wrong wire type as an unknown field, so
    # the decoder yields an empty instance_uid, which the session then rejects by name.
    message = decode_agent_to_server(b"\x08\x05\x12\x02hi")
    assert message.instance_uid == b""
    assert message.sequence_num == 0


def test_a_varint_that_never_ends_is_rejected():
    with pytest.raises(FrameError):
        decode_agent_to_server(b"\x10" + b"\xff" * 11)


def test_an_empty_frame_is_an_empty_message():
    assert decode_agent_ws_frame(b"") == opamp_pb2.AgentToServer()


def test_the_largest_sequence_number_round_trips():
    message = opamp_pb2.AgentToServer(instance_uid=UID, sequence_num=2**64 - 1)
    assert decode_agent_ws_frame(encode_ws_frame(message)).sequence_num == 2**64 - 1


@given(st.binary(max_size=512))
def test_arbitrary_bytes_either_decode_or_raise_frame_error(data: bytes):
    with contextlib.suppress(FrameError):
        decode_agent_ws_frame(data)
