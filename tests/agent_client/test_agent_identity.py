"""The instance_uid: generated once as a UUIDv7, persisted, replaced only by the server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent_client import FileState, StateError
from agent_client.testing import FakeWebSocketServer, echo_reply
from opamp.identifiers import new_instance_uid
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import QUIET, attributes, full_state_request, is_full_report, make_agent, running


async def test_the_instance_uid_is_a_uuid7_stored_in_the_state_dir(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir)):
        first = await ws_server.next_message()
    stored = uuid.UUID((state_dir / "instance_uid").read_text().strip())
    assert stored.bytes == first.instance_uid
    assert stored.version == 7


async def test_a_restarted_agent_keeps_its_instance_uid(ws_server: FakeWebSocketServer, state_dir: Path) -> None:
    async with running(make_agent(ws_server.url, state_dir)):
        before = await ws_server.next_message()
    await ws_server.next_message()  # the first run's disconnect
    async with running(make_agent(ws_server.url, state_dir)):
        after = await ws_server.next_message()
    assert after.instance_uid == before.instance_uid
    assert is_full_report(after)


async def test_the_agent_adopts_and_persists_a_new_instance_uid_from_the_server(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    assigned = new_instance_uid()

    def assign_on_first_message(message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = echo_reply(message)
        if message.sequence_num == 1:
            reply.agent_identification.new_instance_uid = assigned
        return reply

    ws_server.responder = assign_on_first_message
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        renamed = await ws_server.next_message()
    # The description names the instance, so the agent reports it again under the new uid.
    assert renamed.instance_uid == assigned
    assert is_full_report(renamed)
    identifying = attributes(renamed.agent_description.identifying_attributes)
    assert identifying["service.instance.id"] == str(uuid.UUID(bytes=assigned))
    assert FileState(state_dir).load_instance_uid() == assigned

    ws_server.responder = echo_reply
    await ws_server.next_message()  # disconnect
    async with running(make_agent(ws_server.url, state_dir)):
        restarted = await ws_server.next_message()
    assert restarted.instance_uid == assigned


@pytest.mark.parametrize("bad_uid", [b"\x01" * 15, b"\x01" * 17, bytes(16)], ids=["15 bytes", "17 bytes", "all zero"])
async def test_an_invalid_new_instance_uid_from_the_server_is_ignored(
    ws_server: FakeWebSocketServer, state_dir: Path, bad_uid: bytes
) -> None:
    ws_server.responder = lambda message: pb.ServerToAgent(
        instance_uid=message.instance_uid, agent_identification=pb.AgentIdentification(new_instance_uid=bad_uid)
    )
    agent = make_agent(ws_server.url, state_dir)
    original = agent.instance_uid
    async with running(agent):
        await ws_server.next_message()
        await ws_server.push(full_state_request())  # its answer proves the bad reply was handled
        second = await ws_server.next_message()
    assert second.instance_uid == original
    assert FileState(state_dir).load_instance_uid() == original


def test_a_corrupt_instance_uid_file_is_an_error_not_a_new_identity(state_dir: Path) -> None:
    FileState(state_dir)  # creates the directory
    (state_dir / "instance_uid").write_text("not-a-uuid\n")
    with pytest.raises(StateError, match="not a UUID"):
        make_agent("ws://127.0.0.1:9/v1/opamp", state_dir, QUIET)
    assert (state_dir / "instance_uid").read_text() == "not-a-uuid\n"
