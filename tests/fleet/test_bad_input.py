"""Every bad input gets a clear answer, and the agent next to it keeps being served."""

from __future__ import annotations

import gzip
import uuid

import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.test import override_settings

from fleet.consumers import CLOSE_MESSAGE_TOO_BIG, CLOSE_UNSUPPORTED_DATA
from fleet.models import Agent
from opamp.codec import encode_ws_frame
from opamp.identifiers import uuid7
from opamp.proto import anyvalue_pb2, opamp_pb2
from tests.fleet.asgi_clients import WsAgent, decode_http_reply, http_exchange, http_post
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

BAD_REQUEST = opamp_pb2.ServerErrorResponseType_BadRequest


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def nested_array_value(depth: int) -> bytes:
    """An AnyValue nested `depth` arrays deep, built on the wire (the Python API would recurse)."""
    data = anyvalue_pb2.AnyValue(string_value="leaf").SerializeToString()
    for _ in range(depth):
        array = b"\x0a" + varint(len(data)) + data
        data = b"\x2a" + varint(len(array)) + array
    return data


def message_with_attribute_value(uid: bytes, value: bytes) -> bytes:
    key_value = b"\x0a\x04deep\x12" + varint(len(value)) + value
    description = b"\x0a" + varint(len(key_value)) + key_value
    return opamp_pb2.AgentToServer(instance_uid=uid, sequence_num=1, capabilities=1).SerializeToString() + (
        b"\x1a" + varint(len(description)) + description
    )


def assert_bad_request(reply: opamp_pb2.ServerToAgent, *, contains: str) -> None:
    assert reply.error_response.type == BAD_REQUEST
    assert contains in reply.error_response.error_message
    # A reply with error_response carries nothing else.
    assert not reply.HasField("remote_config") and reply.flags == 0 and reply.capabilities == 0


async def assert_neighbour_served(neighbour: WsAgent, uid: bytes, seq: int) -> None:
    reply = await neighbour.exchange(heartbeat(uid, seq))
    assert reply.instance_uid == uid and not reply.HasField("error_response")


@pytest.fixture
async def neighbour():
    """A healthy agent connected beside the misbehaving one."""
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        yield agent, uid


async def test_a_non_zero_header_byte_gets_bad_request(neighbour):
    async with WsAgent() as bad:
        await bad.send_raw(b"\x03" + heartbeat(uuid7().bytes, 1).SerializeToString())
        assert_bad_request(await bad.receive(), contains="only 0 is defined")
        # The socket stays usable for a correct frame.
        assert (await bad.exchange(full_report(uuid7().bytes, 1))).capabilities
    await assert_neighbour_served(*neighbour, 2)


async def test_a_text_frame_closes_the_socket_as_unsupported_data(neighbour):
    async with WsAgent() as bad:
        await bad.send_raw(text="hello")
        assert (await bad.receive_close())["code"] == CLOSE_UNSUPPORTED_DATA
    await assert_neighbour_served(*neighbour, 2)


async def test_a_truncated_protobuf_gets_bad_request(neighbour):
    payload = full_report(uuid7().bytes, 1).SerializeToString()[:-5]
    async with WsAgent() as bad:
        await bad.send_raw(b"\x00" + payload)
        assert_bad_request(await bad.receive(), contains="undecodable AgentToServer")
    await assert_neighbour_served(*neighbour, 2)


async def test_a_wrong_wire_type_for_instance_uid_gets_bad_request(neighbour):
    async with WsAgent() as bad:
        await bad.send_raw(b"\x00\x08\x05\x10\x01")  # instance_uid as a varint
        assert_bad_request(await bad.receive(), contains="instance_uid must be 16 bytes, got 0")
    await assert_neighbour_served(*neighbour, 2)


@pytest.mark.parametrize(
    ("uid", "reason"),
    [
        (b"\x00" * 16, "must not be all zero"),
        (b"\x01" * 15, "must be 16 bytes, got 15"),
        (b"\x01" * 17, "must be 16 bytes, got 17"),
    ],
)
async def test_a_malformed_instance_uid_gets_bad_request_on_both_transports(neighbour, uid: bytes, reason: str):
    async with WsAgent() as bad:
        assert_bad_request(await bad.exchange(heartbeat(uid, 1)), contains=reason)
    response = await http_post(heartbeat(uid, 1).SerializeToString())
    assert response["status"] == 400
    assert_bad_request(decode_http_reply(response), contains=reason)
    assert await sync_to_async(Agent.objects.count)() == 1
    await assert_neighbour_served(*neighbour, 2)


@override_settings(OPAMP_MAX_MESSAGE_BYTES=1024 * 1024)
async def test_an_oversized_websocket_frame_is_closed_as_too_big(neighbour):
    async with WsAgent() as bad:
        await bad.send_raw(b"\x00" + b"\x0a" * (1024 * 1024 + 1))
        assert (await bad.receive_close())["code"] == CLOSE_MESSAGE_TOO_BIG
    await assert_neighbour_served(*neighbour, 2)


async def test_a_100_mib_http_body_gets_413_before_it_is_read():
    response = await http_post(b"", headers=[(b"content-length", str(100 * 1024 * 1024).encode())])
    assert response["status"] == 413


@override_settings(OPAMP_MAX_MESSAGE_BYTES=64 * 1024)
async def test_an_http_body_over_the_limit_without_content_length_gets_413():
    response = await http_post(b"\x0a" * (64 * 1024 + 1))
    assert response["status"] == 413


@override_settings(OPAMP_MAX_MESSAGE_BYTES=1024 * 1024)
async def test_a_gzip_bomb_is_refused_without_inflating_it_whole():
    bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 128 * 1024
    response = await http_post(bomb, headers=[(b"content-encoding", b"gzip")])
    assert response["status"] == 413


async def test_a_corrupt_gzip_body_gets_400():
    response = await http_post(b"\x1f\x8b\x08\x00garbage", headers=[(b"content-encoding", b"gzip")])
    assert response["status"] == 400
    assert_bad_request(decode_http_reply(response), contains="invalid gzip body")


async def test_an_undecodable_http_body_gets_400_with_a_bad_request_reply():
    response = await http_post(b"\xff\xff\xff")
    assert response["status"] == 400
    assert response["headers_dict"][b"content-type"] == b"application/x-protobuf"
    assert_bad_request(decode_http_reply(response), contains="undecodable AgentToServer")


async def test_unknown_capability_bits_are_ignored(neighbour):
    uid = uuid7().bytes
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uid, 1, capabilities=0xFFFF_FFFF_FFFF_FFFF))
    assert not reply.HasField("error_response")
    row = await sync_to_async(Agent.objects.get)(instance_uid=uuid.UUID(bytes=uid))
    assert row.capabilities == 0xFFFF


async def test_the_largest_sequence_number_is_stored_exactly(neighbour):
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 2**64 - 1))
        row = await sync_to_async(Agent.objects.get)(instance_uid=uuid.UUID(bytes=uid))
        assert row.sequence_num == 2**64 - 1
        gap = await agent.exchange(heartbeat(uid, 0))  # wrapped around: a gap
    assert gap.flags & 0x1


async def test_nesting_10000_levels_deep_gets_bad_request(neighbour):
    frame = message_with_attribute_value(uuid7().bytes, nested_array_value(10_000))
    async with WsAgent() as bad:
        await bad.send_raw(b"\x00" + frame)
        assert_bad_request(await bad.receive(), contains="undecodable AgentToServer")
    await assert_neighbour_served(*neighbour, 2)


async def test_moderate_nesting_is_cut_at_the_depth_cap_before_storage():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.send_raw(b"\x00" + message_with_attribute_value(uid, nested_array_value(30)))
        assert not (await agent.receive()).HasField("error_response")
    row = await sync_to_async(Agent.objects.get)(instance_uid=uuid.UUID(bytes=uid))
    value = row.identifying_attributes["deep"]
    depth = 0
    while isinstance(value, list):
        value, depth = value[0], depth + 1
    assert depth < 10
    assert "nesting deeper than" in value


async def test_invalid_utf8_in_an_attribute_gets_bad_request(neighbour):
    bad_string = b"\x0a\x04\xff\xfe\xfd\xfc"  # AnyValue.string_value with invalid UTF-8
    frame = message_with_attribute_value(uuid7().bytes, bad_string)
    async with WsAgent() as bad:
        await bad.send_raw(b"\x00" + frame)
        assert_bad_request(await bad.receive(), contains="undecodable AgentToServer")
    response = await http_post(frame)
    assert response["status"] == 400
    await assert_neighbour_served(*neighbour, 2)


async def test_long_attribute_values_are_capped():
    uid = uuid7().bytes
    reply = await http_exchange(full_report(uid, 1, extra_identifying={"long": "x" * 100_000}))
    assert not reply.HasField("error_response")
    row = await sync_to_async(Agent.objects.get)(instance_uid=uuid.UUID(bytes=uid))
    assert len(row.identifying_attributes["long"]) < 5000


async def test_http_methods_other_than_post_get_405():
    response = await http_post(b"", method="GET")
    assert response["status"] == 405


async def test_a_legacy_frame_without_header_is_served():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.send_raw(full_report(uid, 1).SerializeToString())
        assert (await agent.receive()).instance_uid == uid


async def test_frames_are_answered_with_the_header_byte():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.send_raw(encode_ws_frame(full_report(uid, 1)))
        raw = await agent.communicator.receive_from()
    assert raw[0] == 0
