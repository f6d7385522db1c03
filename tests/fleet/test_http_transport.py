from __future__ import annotations

import gzip

import pytest

from fleet.http_transport import respond_message
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import decode_http_reply, http_post
from tests.fleet.messages import full_report

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


async def test_the_reply_content_type_is_exactly_application_x_protobuf():
    response = await http_post(full_report(uuid7().bytes, 1).SerializeToString())
    assert response["status"] == 200
    assert response["headers_dict"][b"content-type"] == b"application/x-protobuf"


async def test_a_gzip_request_body_is_accepted():
    uid = uuid7().bytes
    body = gzip.compress(full_report(uid, 1).SerializeToString())
    response = await http_post(body, headers=[(b"content-encoding", b"gzip")])
    assert response["status"] == 200
    assert decode_http_reply(response).instance_uid == uid


async def test_a_large_reply_is_gzipped_when_the_agent_accepts_gzip():
    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    reply = opamp_pb2.ServerToAgent(instance_uid=uuid7().bytes)
    reply.remote_config.config.config_map[""].body = b"receivers: {}\n" * 200
    scope = {"headers": [(b"accept-encoding", b"gzip, deflate")]}
    await respond_message(scope, send, reply)
    headers = dict(sent[0]["headers"])
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"content-type"] == b"application/x-protobuf"
    assert opamp_pb2.ServerToAgent.FromString(gzip.decompress(sent[1]["body"])) == reply


async def test_replies_are_not_gzipped_for_agents_that_did_not_ask():
    response = await http_post(full_report(uuid7().bytes, 1).SerializeToString())
    assert b"content-encoding" not in response["headers_dict"]


async def test_an_unknown_content_encoding_gets_400():
    response = await http_post(b"abc", headers=[(b"content-encoding", b"br")])
    assert response["status"] == 400
    assert "unsupported Content-Encoding" in decode_http_reply(response).error_response.error_message
