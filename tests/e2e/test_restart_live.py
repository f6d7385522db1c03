"""Restart and custom messages end to end: a server process as production starts it (daphne),
`agent_client` agents over WebSocket and over plain HTTP, and the REST API as an operator
uses it.

A restart of a label selector reaches each selected agent that accepts restarts exactly once,
over both transports; each comes back as a new process would (a new start time in its
health) and the agents the selector leaves out, or that do not accept restarts, never
restart. The audit names who asked. A custom message to the same selector arrives exactly
once at each selected agent that declared its capability, and at no other.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.state import MemoryState
from agent_client.transport import TransportKind, transport_for_url
from opamp.config_signature import CUSTOM_CAPABILITY as SIGNED_CONFIG_CAPABILITY
from opamp.proto import opamp_pb2 as pb
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server, pytest.mark.asyncio]

TRANSPORTS: tuple[TransportKind, ...] = ("ws", "http")
HEARTBEAT = 1.0
# Heartbeats after the last delivery during which nothing more may arrive.
QUIET_HEARTBEATS = 4
# agent_client declares this custom capability when it checks config signatures: the one a
# stock agent_client declares without enrolling for a certificate.
CAPABILITY = SIGNED_CONFIG_CAPABILITY


class Seen(AgentObserver):
    """What each agent carried out: restarts, and the custom messages it was sent."""

    def __init__(self) -> None:
        self.restarts: Counter[str] = Counter()
        self.messages: defaultdict[str, list[tuple[str, str, bytes]]] = defaultdict(list)

    def on_restart(self, agent: Agent) -> None:
        self.restarts[agent.name] += 1

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        if reply.HasField("custom_message"):
            sent = reply.custom_message
            self.messages[agent.name].append((sent.capability, sent.type, bytes(sent.data)))


@dataclass(frozen=True)
class Role:
    selected: bool  # the selector picks it
    accepts_restart: bool
    declares_capability: bool


ROLES = {
    "picked": Role(selected=True, accepts_restart=True, declares_capability=True),
    "picked-old": Role(selected=True, accepts_restart=False, declares_capability=False),
    "other": Role(selected=False, accepts_restart=True, declares_capability=True),
}
PICKED_PER_TRANSPORT = 3


def fleet_plan() -> list[tuple[str, TransportKind, str]]:
    """(agent name, transport, role): three picked agents per transport, one picked that
    accepts neither restarts nor the message, one left out by the selector."""
    plan: list[tuple[str, TransportKind, str]] = []
    for kind in TRANSPORTS:
        plan += [(f"picked-{kind}-{n}", kind, "picked") for n in range(PICKED_PER_TRANSPORT)]
        plan += [(f"picked-old-{kind}", kind, "picked-old"), (f"other-{kind}", kind, "other")]
    return plan


def make_agent(server: LiveOpampServer, service: str, name: str, kind: TransportKind, role: Role, seen: Seen) -> Agent:
    settings = AgentSettings(
        identifying_attributes={"service.name": service, "service.instance.id": name},
        non_identifying_attributes={"tier": "web" if role.selected else "db"},
        heartbeat_interval=HEARTBEAT,
        accept_restart=role.accepts_restart,
        # An empty key set declares the signed-config capability (and would refuse every
        # config; none is offered here).
        trusted_keys={} if role.declares_capability else None,
        backoff_initial=0.2,
        backoff_max=1.0,
    )
    transport = transport_for_url(server.ws_url, kind=kind, trust_env=False, ping_interval=None)
    return Agent(transport=transport, state=MemoryState(), settings=settings, observer=seen, name=name)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveOpampServer]:
    live = LiveOpampServer(tmp_path / "server")
    live.start()
    try:
        yield live
    finally:
        live.close()


async def wait_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last {found!r}")
        await asyncio.sleep(0.1)


async def api(server: LiveOpampServer, path: str, **params: Any) -> Any:
    return await asyncio.to_thread(server.api, path, **params)


async def api_post(server: LiveOpampServer, path: str, payload: Any) -> Any:
    return await asyncio.to_thread(server.api_post, path, payload)


async def inventory(server: LiveOpampServer, service: str) -> dict[str, dict[str, Any]]:
    """The server's agents of this test by name, each as its detail page shows it (health
    included)."""
    rows = await asyncio.to_thread(server.agents, attribute=f"service.name={service}")
    details = [await api(server, f"agents/{row['instance_uid']}/") for row in rows]
    return {row["identifying_attributes"]["service.instance.id"]: row for row in details}


def started_at(row: dict[str, Any]) -> int:
    return int((row.get("health") or {}).get("start_time_unix_nano") or 0)


async def test_a_selector_restart_and_custom_message_reach_each_picked_agent_once_over_both_transports(
    server: LiveOpampServer,
) -> None:
    service = f"restart-{secrets.token_hex(3)}"
    seen = Seen()
    plan = fleet_plan()
    agents = {name: make_agent(server, service, name, kind, ROLES[role], seen) for name, kind, role in plan}
    role_of = {name: ROLES[role] for name, _, role in plan}
    tasks = [asyncio.create_task(agent.run(), name=name) for name, agent in agents.items()]
    try:
        # Every agent's full report is in the inventory (with its start time).
        deadline = time.monotonic() + 30
        while True:
            before = await inventory(server, service)
            if len(before) == len(plan) and all(started_at(row) for row in before.values()):
                break
            assert time.monotonic() < deadline, f"agents registered: {sorted(before)}"
            await asyncio.sleep(0.2)
        assert {row["transport"] for row in before.values()} == {"websocket", "http"}

        # -- restart -----------------------------------------------------------------------
        selector = f"service.name={service},tier=web"
        answer = await api_post(server, "commands/restart/", {"selector": selector})
        picked = {name for name, role in role_of.items() if role.selected and role.accepts_restart}
        assert (answer["requested"], answer["not_capable"], answer["rate_limited"]) == (len(picked), 2, 0)
        asker = answer["commands"][0]["requested_by"]
        assert asker and {command["requested_by"] for command in answer["commands"]} == {asker}

        await wait_until(
            lambda: all(seen.restarts[name] >= 1 for name in picked), timeout=30, what="every picked agent restarted"
        )
        await asyncio.sleep(QUIET_HEARTBEATS * HEARTBEAT)  # a second delivery would land here
        assert {name: seen.restarts[name] for name in agents} == {name: int(name in picked) for name in agents}
        assert {name: agents[name].restarts for name in agents} == {name: int(name in picked) for name in agents}

        # The server saw each come back as a new process: a later start time in its health.
        async def restarted_on_record() -> dict[str, dict[str, Any]]:
            after = await inventory(server, service)
            ok = all(started_at(after[name]) > started_at(before[name]) for name in picked)
            return after if ok else {}

        deadline = time.monotonic() + 15
        while not (after := await restarted_on_record()):
            assert time.monotonic() < deadline, "the restarted agents' new start times never reached the inventory"
            await asyncio.sleep(0.2)
        for name in set(agents) - picked:
            assert started_at(after[name]) == started_at(before[name]), name

        commands = (await api(server, "commands/", limit=100))["results"]
        mine = [
            command for command in commands if command["instance_uid"] in {after[n]["instance_uid"] for n in agents}
        ]
        assert len(mine) == len(picked)
        assert {command["state"] for command in mine} == {"delivered"}
        assert all(command["reported_since"] for command in mine)
        assert {command["instance_uid"] for command in mine} == {after[name]["instance_uid"] for name in picked}

        # The audit names who asked, one row per agent, with the selector.
        audit = (await api(server, "audit/", action="agent.restart", limit=100))["results"]
        assert sorted(row["details"]["instance_uid"] for row in audit) == sorted(
            after[name]["instance_uid"] for name in picked
        )
        assert {(row["actor"], row["details"]["selector"]) for row in audit} == {(asker, selector)}

        # -- a custom message ------------------------------------------------------------
        capable = {name for name, role in role_of.items() if role.selected and role.declares_capability}
        sent = await api_post(
            server,
            "custom-messages/",
            {
                "selector": selector,
                "capability": CAPABILITY,
                "type": "hello",
                "data": base64.b64encode(b"\x00hi").decode(),
            },
        )
        assert (sent["queued"], sent["not_capable"]) == (len(capable), 2)
        expected = [(CAPABILITY, "hello", b"\x00hi")]
        await wait_until(
            lambda: all(seen.messages[name] for name in capable), timeout=30, what="every capable agent's message"
        )
        await asyncio.sleep(QUIET_HEARTBEATS * HEARTBEAT)
        assert {name: seen.messages.get(name, []) for name in agents} == {
            name: expected if name in capable else [] for name in agents
        }
        queued = (await api(server, "custom-messages/", limit=100))["results"]
        assert sorted(row["state"] for row in queued) == ["delivered"] * len(capable)
        audit = (await api(server, "audit/", action="agent.custom_message.send", limit=100))["results"]
        assert len(audit) == len(capable) and {row["actor"] for row in audit} == {asker}
    finally:
        for agent in agents.values():
            agent.stop()
        await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
