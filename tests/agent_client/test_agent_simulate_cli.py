"""`python -m agent_client simulate`: N agents, a failing share, a slow apply, a progress line."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest

from agent_client.agent_settings import AgentSettings
from agent_client.cli import build_parser
from agent_client.cli_commands import simulate_fleet
from agent_client.remote_config import MARKER_REJECTED
from agent_client.simulator import spread_evenly
from agent_client.testing import SERVER_CAPABILITIES, FakeWebSocketServer
from opamp.proto import opamp_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[2]
BODY = b"receivers: {}\n# candidate-marker\n"
CONFIG_HASH = hashlib.sha256(BODY).digest()


def offer_config(message: pb.AgentToServer) -> pb.ServerToAgent:
    """Every reply offers the same config; an agent applies a hash once."""
    return pb.ServerToAgent(
        instance_uid=message.instance_uid,
        capabilities=SERVER_CAPABILITIES,
        remote_config=pb.AgentRemoteConfig(
            config=pb.AgentConfigMap(config_map={"collector.yaml": pb.AgentConfigFile(body=BODY)}),
            config_hash=CONFIG_HASH,
        ),
    )


@pytest.mark.parametrize(("count", "fraction", "expected"), [(10, 0.3, 3), (20, 0.05, 1), (7, 1.0, 7), (5, 0.0, 0)])
def test_the_failing_share_is_spread_over_the_fleet(count: int, fraction: float, expected: int) -> None:
    chosen = spread_evenly(count, fraction)
    assert len(chosen) == expected
    if 0 < expected < count:
        assert chosen != set(range(expected))  # not simply the first ones


def test_simulate_flags_become_per_agent_settings() -> None:
    options = build_parser().parse_args(
        [
            "simulate",
            "--server",
            "ws://127.0.0.1:1/v1/opamp",
            "--agents",
            "10",
            "--attr",
            "service.name=demo",
            "--fail-if-contains",
            "bad",
            "--fail-fraction",
            "0.2",
            "--apply-delay",
            "1.5",
        ]
    )
    fleet = simulate_fleet(options)
    settings = [agent.settings for agent in fleet.agents]
    assert len(settings) == 10
    assert [s.fail_if_contains for s in settings].count(b"bad") == 2
    assert all(s.apply_delay == 1.5 and s.identifying_attributes == {"service.name": "demo"} for s in settings)


@pytest.mark.parametrize("bad", [["--fail-fraction", "1.5"], ["--agents", "0"], ["--apply-delay", "-1"]])
def test_out_of_range_simulate_flags_are_usage_errors(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["simulate", "--server", "ws://127.0.0.1:1/v1/opamp", *bad])
    assert exit_.value.code == 2


def test_a_negative_apply_delay_is_refused_by_the_settings() -> None:
    with pytest.raises(ValueError):
        AgentSettings(apply_delay=-1)


async def test_simulate_runs_agents_that_fail_and_apply_slowly_printing_progress_until_sigterm() -> None:
    async with FakeWebSocketServer(offer_config) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent_client",
            "simulate",
            "--server",
            server.url,
            "--agents",
            "10",
            "--attr",
            "service.name=sim",
            "--fail-if-contains",
            "candidate-marker",
            "--fail-fraction",
            "0.3",
            "--apply-delay",
            "1",
            "--progress-interval",
            "0.2",
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            lines: list[str] = []
            assert process.stdout is not None
            async with asyncio.timeout(20):
                while not any("applied 7" in line and "failed 3" in line for line in lines):
                    line = (await process.stdout.readline()).decode()
                    assert line, "simulate exited early"
                    lines.append(line)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                rest, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    output = "".join(lines) + rest.decode()
    assert process.returncode == 0, stderr.decode()
    assert lines[0].startswith("simulating 10 agents against ws://127.0.0.1:")
    assert "3 of them fail configs containing 'candidate-marker'" in lines[0]
    short = CONFIG_HASH.hex()[:8]
    # The one-second apply shows as "applying" before any agent has an answer.
    assert any(f"10/10 connected | {short} applying 10 |" in line for line in lines), output
    assert f"stopped: 0/10 connected | {short} applied 7 | {short} failed 3" in output
    statuses = [m.remote_config_status for m in server.messages if m.HasField("remote_config_status")]
    failures = {s.error_message for s in statuses if s.status == pb.RemoteConfigStatuses_FAILED}
    assert failures == {MARKER_REJECTED.format(marker="candidate-marker")}
    uids = {m.instance_uid for m in server.messages}
    assert len(uids) == 10
    names = {
        attribute.value.string_value
        for m in server.messages
        for attribute in m.agent_description.identifying_attributes
        if attribute.key == "service.name"
    }
    assert names == {"sim"}
    assert sum(1 for m in server.messages if m.HasField("agent_disconnect")) == 10
