"""Packages end to end: a server process as production starts it (daphne), signing package
files with its configured key, and `agent_client` agents over WebSocket and plain HTTP that
download, verify and install what they are offered.

Packages are uploaded through the REST API and assigned by a label selector: every selected
agent downloads the file, checks its SHA-256 and signature, installs it into its package
directory and reports it Installed; the package status API counts it; agents the selector
leaves out are offered nothing. Moving the assignment to version 2 moves the selected
agents. Each agent is offered each package set once: no re-offer loop, over either
transport.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.packages import PackageSettings, PackageStore
from agent_client.state import MemoryState
from agent_client.transport import TransportKind, transport_for_url
from opamp.config_signature import key_id_for, load_public_key_pem
from opamp.proto import opamp_pb2 as pb
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server, pytest.mark.asyncio]

TRANSPORTS: tuple[TransportKind, ...] = ("ws", "http")
HEARTBEAT = 0.5
QUIET_SECONDS = 3.0  # after the last install, during which no offer may arrive
PICKED_PER_TRANSPORT = 2
PACKAGE = "collector"
V1 = b"#!/bin/sh\necho collector 1.0.0\n"
V2 = b"#!/bin/sh\necho collector 2.0.0\n" + b"x" * 200_000  # more than one download chunk


class Offers(AgentObserver):
    """Every packages_available each agent was sent: its all_packages_hash."""

    def __init__(self) -> None:
        self.by_agent: defaultdict[str, list[bytes]] = defaultdict(list)

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        if reply.HasField("packages_available"):
            self.by_agent[agent.name].append(bytes(reply.packages_available.all_packages_hash))


def make_agent(
    server: LiveOpampServer,
    service: str,
    name: str,
    kind: TransportKind,
    *,
    picked: bool,
    root: Path,
    key: Path,
    offers: Offers,
) -> Agent:
    public_key = load_public_key_pem(key.read_bytes())
    settings = AgentSettings(
        identifying_attributes={"service.name": service, "service.instance.id": name},
        non_identifying_attributes={"tier": "web" if picked else "db"},
        heartbeat_interval=HEARTBEAT,
        trusted_keys={key_id_for(public_key): public_key},
        packages=PackageSettings(directory=root / name),
        backoff_initial=0.2,
        backoff_max=1.0,
    )
    url = server.ws_url if kind == "ws" else server.http_url
    transport = transport_for_url(url, kind=kind, trust_env=False, ping_interval=None)
    return Agent(transport=transport, state=MemoryState(), settings=settings, observer=offers, name=name)


async def wait_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(check)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last {found!r}")
        await asyncio.sleep(0.2)


def installed_version(agent: Agent) -> str | None:
    installed = agent.packages.installed.get(PACKAGE)
    return installed.version if installed is not None else None


async def test_assigned_packages_are_installed_by_the_selected_agents_over_both_transports(signing_server, tmp_path):
    server, key = signing_server
    service = f"packages-{secrets.token_hex(3)}"
    server.api_post("packages/", {"name": PACKAGE, "type": "top_level"})
    first = server.upload_package(PACKAGE, "1.0.0", V1)
    assert first["signature"] and first["key_id"]
    second = server.upload_package(PACKAGE, "2.0.0", V2)

    offers = Offers()
    agents: dict[str, Agent] = {}
    picked: set[str] = set()
    for kind in TRANSPORTS:
        for n in range(PICKED_PER_TRANSPORT):
            name = f"picked-{kind}-{n}"
            picked.add(name)
            agents[name] = make_agent(
                server, service, name, kind, picked=True, root=tmp_path / "pkgs", key=key, offers=offers
            )
        name = f"other-{kind}"
        agents[name] = make_agent(
            server, service, name, kind, picked=False, root=tmp_path / "pkgs", key=key, offers=offers
        )
    tasks = [asyncio.create_task(agent.run(), name=name) for name, agent in agents.items()]
    try:
        await wait_until(
            lambda: len(server.agents(attribute=f"service.name={service}")) == len(agents),
            timeout=30,
            what="every agent registered",
        )
        server.api_post(
            "package-assignments/",
            {
                "name": f"{service}-web",
                "package": PACKAGE,
                "version": "1.0.0",
                "selector": f"service.name={service},tier=web",
            },
        )
        await wait_until(
            lambda: all(installed_version(agents[name]) == "1.0.0" for name in picked),
            timeout=60,
            what="every picked agent installed 1.0.0",
        )
        for name in picked:
            store = PackageStore(tmp_path / "pkgs" / name)
            assert store.current_version(PACKAGE) == "1.0.0"
            assert [p.read_bytes() for p in store.current(PACKAGE).iterdir()] == [V1]

        def summary() -> dict[str, Any]:
            return dict(server.api(f"packages/{PACKAGE}/status/")["versions"])

        await wait_until(
            lambda: summary().get("1.0.0", {}).get("installed") == len(picked),
            timeout=30,
            what="the status API counts every picked agent on 1.0.0",
        )

        # -- version 2 ---------------------------------------------------------------------
        server.api_post(f"package-assignments/{service}-web/", {"version": "2.0.0"}, method="PATCH")
        await wait_until(
            lambda: all(installed_version(agents[name]) == "2.0.0" for name in picked),
            timeout=60,
            what="every picked agent installed 2.0.0",
        )
        await wait_until(
            lambda: summary().get("2.0.0", {}).get("installed") == len(picked) and "1.0.0" not in summary(),
            timeout=30,
            what="the status API counts every picked agent on 2.0.0",
        )
        for name in picked:
            store = PackageStore(tmp_path / "pkgs" / name)
            assert store.current_version(PACKAGE) == "2.0.0"
            assert [p.read_bytes() for p in store.current(PACKAGE).iterdir()] == [V2]
        rows = {
            row["identifying_attributes"]["service.instance.id"]: server.api(f"agents/{row['instance_uid']}/")
            for row in server.agents(attribute=f"service.name={service}")
        }
        for name in picked:
            reported = rows[name]["package_statuses"]["packages"][PACKAGE]
            assert (reported["status"], reported["agent_has_version"]) == ("Installed", "2.0.0")
            assert reported["agent_has_hash"]
        assert second["sha256"] != first["sha256"]

        # No re-offer loop: a quiet period brings no offer, and each picked agent was sent
        # each package set once (two sets), the others none.
        before = {name: len(offers.by_agent[name]) for name in agents}
        await asyncio.sleep(QUIET_SECONDS)
        assert {name: len(offers.by_agent[name]) for name in agents} == before
        for name in picked:
            hashes = offers.by_agent[name]
            assert len(hashes) == 2 and len(set(hashes)) == 2, (name, [h.hex()[:8] for h in hashes])
        for name in set(agents) - picked:
            assert offers.by_agent[name] == [] and agents[name].packages.installed == {}
            assert not (rows[name].get("package_statuses") or {}).get("packages")
    finally:
        for agent in agents.values():
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
