"""One instance_uid on two real daphne processes sharing PostgreSQL and Redis: a different
agent is given a new uid, the same agent takes over (production profile)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import websockets

from opamp.identifiers import uuid7
from tests.fleet.messages import full_report, heartbeat
from tests.fleet.test_hints_live import SERVER_LOG_ERRORS, exchange, server_logs, start_server
from tests.support.live_server import LiveOpampServer, production_profile

pytestmark = [
    pytest.mark.live_server,
    pytest.mark.skipif(
        not production_profile(),
        reason="two server processes share PostgreSQL and Redis: needs OPAMP_TEST_PROFILE=production",
    ),
]


async def a_different_agent_then_the_same_one(server: LiveOpampServer) -> None:
    uid = uuid7().bytes
    async with websockets.connect(server.ws_urls[0]) as original:
        await exchange(original, full_report(uid, 1, service="checkout"))
        async with websockets.connect(server.ws_urls[1]) as impostor:
            reply = await exchange(impostor, full_report(uid, 1, service="payments"))
            new_uid = reply.agent_identification.new_instance_uid
            assert len(new_uid) == 16 and new_uid != uid
            await exchange(impostor, full_report(new_uid, 2, service="payments"))
            await asyncio.sleep(0.5)  # a takeover hint, had one been sent, has arrived
            # The original's socket stays open and served; its row keeps its attributes.
            assert (await exchange(original, heartbeat(uid, 2))).instance_uid == uid
            agents = {agent["instance_uid"]: agent for agent in server.agents()}
            row = agents[str(uuid.UUID(bytes=uid))]
            assert row["identifying_attributes"]["service.name"] == "checkout"
            assert row["connected"] is True
            assert agents[str(uuid.UUID(bytes=new_uid))]["identifying_attributes"]["service.name"] == "payments"
        async with websockets.connect(server.ws_urls[1]) as again:
            # The same agent reconnecting through the other process takes over as before.
            reply = await exchange(again, full_report(uid, 3, service="checkout"))
            assert not reply.HasField("agent_identification")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(original.recv(), timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
            assert (await exchange(again, heartbeat(uid, 4))).instance_uid == uid


def test_one_uid_on_two_server_processes_follows_the_in_process_rule(tmp_path: Path) -> None:
    server, _ = start_server(tmp_path, processes=2)
    try:
        asyncio.run(a_different_agent_then_the_same_one(server))
        assert not any(error in server_logs(server) for error in SERVER_LOG_ERRORS), server_logs(server)[-4000:]
        assert "live on another server process" in server_logs(server)
    finally:
        server.close()
