"""The rollout drill at test size, end to end: a real server process, a real Celery worker
with beat (django-celery-beat's database scheduler), 2,000 simulated agent_client agents
over WebSocket. Stages 1% -> 10% -> 100% with holds of a few seconds, advanced by beat alone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent_client.agent_settings import AgentSettings
from agent_client.simulator import Fleet
from agent_client.state import INSTANCE_UID_FILE
from opamp.identifiers import uuid7
from rollouts.cohorts import bucket_of, percent_threshold
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server, pytest.mark.asyncio]

AGENTS = 2000
MARKER = b"drill-candidate"
STABLE = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
CANDIDATE = {"collector.yaml": {"body": "# drill-candidate\nreceivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
STAGES = [{"percent": 1, "hold_seconds": 2}, {"percent": 10, "hold_seconds": 2}, {"percent": 100}]


@pytest.fixture
def drill_server(tmp_path: Path) -> Any:
    server = LiveOpampServer(
        tmp_path / "server",
        extra_env={"OPAMP_ROLLOUT_TICK_SECONDS": "1", "OPAMP_HEARTBEAT_INTERVAL_SECONDS": "30"},
    )
    server.start()
    server.start_celery()
    try:
        yield server
    finally:
        server.close()


def identities(state_root: Path) -> list[bytes]:
    """Instance uids written into each simulated agent's state dir before it starts, so the
    drill knows every agent's cohort in advance."""
    uids = []
    for index in range(AGENTS):
        uid = uuid7()
        directory = state_root / f"agent-{index:05d}"
        directory.mkdir(parents=True)
        (directory / INSTANCE_UID_FILE).write_text(str(uid))
        uids.append(uid.bytes)
    return uids


def failing_fleet(server: LiveOpampServer, state_root: Path, failing: set[int], service: str) -> Fleet:
    def settings_for(index: int) -> AgentSettings:
        return AgentSettings(
            identifying_attributes={"service.name": service},
            heartbeat_interval=30,
            fail_if_contains=MARKER if index in failing else None,
        )

    return Fleet(server=server.ws_url, count=AGENTS, settings_for=settings_for, connect_rate=100, state_root=state_root)


@pytest_asyncio.fixture
async def connected(drill_server: LiveOpampServer) -> AsyncIterator[Any]:
    """Yields a function that starts a fleet and returns it once every agent is connected."""
    fleets: list[Fleet] = []

    async def connect(fleet: Fleet) -> Fleet:
        fleets.append(fleet)
        await fleet.start()
        # Agents start at 100/s: all at once, the opening handshakes of 2,000 agents time out
        # behind the first reports on a 2-core machine and the reconnects feed the storm.
        # The wait is generous because this test is about rollout semantics, not speed
        # (connect rates are measured in bench/).
        assert await fleet.wait_connected(300), f"{len(fleet.stats.first_reply_at)} of {AGENTS} connected"
        return fleet

    yield connect
    for fleet in fleets:
        await fleet.stop()


def cohort_zero(salt: str, uid: bytes) -> bool:
    return bucket_of(salt, uid) < percent_threshold(1)


def last_cohort(salt: str, uid: bytes) -> bool:
    return bucket_of(salt, uid) >= percent_threshold(10)


async def until(predicate: Callable[[], Any], *, timeout: float, what: str, server: LiveOpampServer) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"timed out: {what}\n--- celery ---\n{server.celery_log()[-3000:]}\n--- server ---\n{server.log()[-2000:]}"
    )


def applied_hashes(fleet: Fleet) -> set[str]:
    return {agent.remote_config.applied_hash.hex() for agent in fleet.agents}


async def prepare(server: LiveOpampServer, service: str) -> tuple[str, str]:
    """A configuration on its stable version for the fleet, plus an unpublished candidate."""
    name = f"drill-{service}"
    await asyncio.to_thread(server.api_post, "configurations/", {"name": name, "selector": f"service.name={service}"})
    stable = await asyncio.to_thread(server.api_post, f"configurations/{name}/versions/", {"files": STABLE})
    candidate = await asyncio.to_thread(
        server.api_post, f"configurations/{name}/versions/", {"files": CANDIDATE, "activate": False}
    )
    return name, stable["config_hash"], candidate  # type: ignore[return-value]


async def run_drill(
    server: LiveOpampServer, fleet: Fleet, name: str, candidate: dict[str, Any], salt: str
) -> dict[str, Any]:
    rollout = await asyncio.to_thread(
        server.api_post,
        "rollouts/",
        {
            "configuration": name,
            "candidate_version": candidate["number"],
            "stages": STAGES,
            "max_failure_rate": 0.001,
            "apply_timeout_seconds": 60,
            "salt": salt,
        },
    )
    await asyncio.to_thread(server.api_post, f"rollouts/{rollout['id']}/start/", {})
    return rollout


def finished(server: LiveOpampServer, rollout_id: int) -> dict[str, Any] | None:
    rollout = server.api(f"rollouts/{rollout_id}/")
    return rollout if rollout["state"] in {"succeeded", "rolled_back", "paused", "aborted"} else None


async def test_one_failing_agent_in_2000_stays_within_budget_and_the_rollout_succeeds(
    drill_server, connected, tmp_path
):
    service = f"drill-ok-{secrets.token_hex(3)}"
    salt = secrets.token_hex(8)
    name, stable_hash, candidate = await prepare(drill_server, service)
    uids = identities(tmp_path / "agents")
    # One agent fails (0.05% of the fleet); it sits in the last cohort, which is where a
    # uniformly chosen agent lands nine times in ten.
    failing_index = next(i for i, uid in enumerate(uids) if last_cohort(salt, uid))
    fleet = await connected(failing_fleet(drill_server, tmp_path / "agents", {failing_index}, service))
    await until(lambda: applied_hashes(fleet) == {stable_hash}, timeout=60, what="stable applied", server=drill_server)

    rollout = await run_drill(drill_server, fleet, name, candidate, salt)
    result = await until(
        lambda: finished(drill_server, rollout["id"]), timeout=300, what="rollout end", server=drill_server
    )
    assert result["state"] == "succeeded", result
    kinds = [event["kind"] for event in drill_server.api(f"rollouts/{rollout['id']}/events/")]
    assert kinds.count("stage_started") == 2  # advanced by beat, stage by stage
    others = [a for i, a in enumerate(fleet.agents) if i != failing_index]
    assert {a.remote_config.applied_hash.hex() for a in others} == {candidate["config_hash"]}
    assert fleet.agents[failing_index].remote_config.status == 3  # FAILED, reported with its error


async def test_one_percent_failing_rolls_back_in_the_first_stage_and_the_fleet_returns_to_stable(
    drill_server, connected, tmp_path
):
    service = f"drill-bad-{secrets.token_hex(3)}"
    name, stable_hash, candidate = await prepare(drill_server, service)
    uids = identities(tmp_path / "agents")
    failing = set(range(0, AGENTS, 100))  # 1% of the fleet, spread evenly by index
    # A salt under which the canary cohort holds at least one failing agent, as a uniform
    # 1% failure rate would put there in a fleet large enough (18,000: 180 canaries).
    salt = next(
        s for s in (secrets.token_hex(8) for _ in range(10_000)) if any(cohort_zero(s, uids[i]) for i in failing)
    )
    fleet = await connected(failing_fleet(drill_server, tmp_path / "agents", failing, service))
    await until(lambda: applied_hashes(fleet) == {stable_hash}, timeout=60, what="stable applied", server=drill_server)

    rollout = await run_drill(drill_server, fleet, name, candidate, salt)
    result = await until(
        lambda: finished(drill_server, rollout["id"]), timeout=300, what="rollout end", server=drill_server
    )
    assert result["state"] == "rolled_back", result
    events = drill_server.api(f"rollouts/{rollout['id']}/events/")
    breach = next(e for e in events if e["kind"] == "budget_exceeded")
    assert breach["stage_index"] == 0
    assert not [e for e in events if e["kind"] == "stage_started"]
    await until(
        lambda: applied_hashes(fleet) == {stable_hash},
        timeout=60,
        what="every agent back on stable",
        server=drill_server,
    )
