"""The fleet simulator and the connect benchmark built on it, against a fake server."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest

from agent_client import Fleet
from agent_client.agent import Agent
from agent_client.simulator import FleetStats
from agent_client.testing import FakeWebSocketServer
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import FAST, is_full_report

BENCH_PATH = Path(__file__).resolve().parents[2] / "bench" / "agents_connect.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agents_connect", BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_a_fleet_connects_every_agent_with_its_own_instance_uid(ws_server: FakeWebSocketServer) -> None:
    async with Fleet(server=ws_server.url, count=10, settings=FAST) as fleet:
        assert await fleet.wait_connected(timeout=2)
    full_reports = [message for message in ws_server.messages if is_full_report(message)]
    assert len({message.instance_uid for message in full_reports}) == 10
    disconnects = [message for message in ws_server.messages if message.HasField("agent_disconnect")]
    assert len(disconnects) == 10


async def test_settings_for_gives_chosen_agents_their_own_behaviour(ws_server: FakeWebSocketServer) -> None:
    failing = replace(FAST, fail_apply=True)
    fleet = Fleet(server=ws_server.url, count=4, settings=FAST, settings_for=lambda i: failing if i == 0 else FAST)
    assert [agent.settings.fail_apply for agent in fleet.agents] == [True, False, False, False]


async def test_agents_are_spread_round_robin_over_several_servers(ws_server: FakeWebSocketServer) -> None:
    async with FakeWebSocketServer() as second:
        async with Fleet(server=[ws_server.url, second.url], count=6, settings=FAST) as fleet:
            assert await fleet.wait_connected(timeout=2)
        for server in (ws_server, second):
            assert len({m.instance_uid for m in server.messages if is_full_report(m)}) == 3


async def test_fleet_agents_can_keep_state_in_a_directory_each(ws_server: FakeWebSocketServer, tmp_path: Path) -> None:
    async with Fleet(server=ws_server.url, count=3, settings=FAST, state_root=tmp_path) as fleet:
        assert await fleet.wait_connected(timeout=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["agent-00000", "agent-00001", "agent-00002"]


async def test_the_bench_reports_connect_time_throughput_and_latency(
    ws_server: FakeWebSocketServer, bench: ModuleType
) -> None:
    summary = await bench.run_bench(
        server=ws_server.url, agents=20, heartbeat=0.1, duration=0.5, warmup=0.1, connect_timeout=2
    )

    assert summary["all_connected"] is True
    assert summary["connected_agents"] == 20
    assert 0 < summary["connect_seconds"] < 2
    # 20 agents at 10 heartbeats/s for 0.5 s: about 100 replies.
    assert summary["heartbeat_replies"] >= 40
    assert summary["replies_per_second"] > 0
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert summary["reconnects"] == 0
    json.dumps(summary)  # the CLI prints it as JSON
    assert sum(message.HasField("agent_disconnect") for message in ws_server.messages) == 20


def test_the_bench_refuses_a_server_that_is_not_on_loopback(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--server", "ws://192.0.2.10:4320/v1/opamp", "--agents", "1", "--duration", "0"])
    bench.require_loopback("ws://127.0.0.1:4320/v1/opamp")
    bench.require_loopback("http://localhost:4320/v1/opamp")


def test_percentiles_use_the_nearest_rank(bench: ModuleType) -> None:
    values = [float(value) for value in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([3.0], 90) == 3.0


def test_a_refusal_does_not_count_as_the_agent_admitted() -> None:
    """Admission pacing answers UNAVAILABLE: the agent is not connected until a real reply."""
    stats = FleetStats(expected=1)
    agent = cast(Agent, object())
    stats.on_connected(agent)
    refusal = pb.ServerToAgent(
        error_response=pb.ServerErrorResponse(type=pb.ServerErrorResponseType_Unavailable, error_message="busy")
    )
    stats.on_reply(agent, refusal, None)
    assert stats.refusals == 1 and not stats.first_reply_at and not stats.all_answered.is_set()
    assert agent not in stats.online
    stats.on_connected(agent)
    stats.on_reply(agent, pb.ServerToAgent(), None)
    assert agent in stats.first_reply_at and stats.all_answered.is_set() and agent in stats.online
