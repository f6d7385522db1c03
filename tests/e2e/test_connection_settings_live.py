"""Telemetry connection settings end to end: a real server process and agent_client agents
over both transports. Settings offered by selector reach the selected agents only, which
apply them (the file for their collector, the heartbeat interval), and the agent API shows
each agent's reported status."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_client import Agent, AgentSettings, FileState, transport_for_url
from agent_client.agent_connection_settings import SETTINGS_FILE
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server, pytest.mark.asyncio]

METRICS = {
    "destination_endpoint": "https://otlp.example:4318/v1/metrics",
    "headers": {"Authorization": "Bearer e2e"},
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveOpampServer]:
    live = LiveOpampServer(tmp_path / "server")
    live.start()
    try:
        yield live
    finally:
        live.close()


def agent(url: str, state_dir: Path, environment: str) -> Agent:
    return Agent(
        transport=transport_for_url(url, trust_env=False),
        state=FileState(state_dir),
        settings=AgentSettings(
            non_identifying_attributes={"deployment.environment": environment},
            heartbeat_interval=1.0,
            accept_connection_settings=True,
        ),
    )


async def test_settings_offered_by_selector_reach_the_selected_agents_only(server: LiveOpampServer, tmp_path: Path):
    agents = {
        "prod-ws": agent(server.ws_url, tmp_path / "prod-ws", "prod"),
        "prod-http": agent(server.http_url, tmp_path / "prod-http", "prod"),
        "dev-ws": agent(server.ws_url, tmp_path / "dev-ws", "dev"),
    }
    tasks = [asyncio.create_task(one.run()) for one in agents.values()]
    try:
        await asyncio.to_thread(server.wait_for, lambda: len(server.agents()) == 3, what="three agents inventoried")
        await asyncio.to_thread(
            server.api_post,
            "telemetry-settings/",
            {
                "name": "prod-telemetry",
                "selector": "deployment.environment=prod",
                "own_metrics": METRICS,
                "heartbeat_interval_seconds": 2,
            },
        )
        selected = [agents["prod-ws"], agents["prod-http"]]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            one.applied_connection_settings.get("own_metrics") for one in selected
        ):
            await asyncio.sleep(0.1)
        for one in selected:
            assert one.applied_connection_settings["own_metrics"] == METRICS
            assert one.heartbeat_interval == 2.0
        for name in ("prod-ws", "prod-http"):
            written = json.loads((tmp_path / name / SETTINGS_FILE).read_text())
            assert written["settings"]["own_metrics"]["destination_endpoint"] == METRICS["destination_endpoint"]

            def shown(name: str = name, written: dict = written) -> bool:
                uid = uuid.UUID(bytes=agents[name].instance_uid)
                row = server.api(f"agents/{uid}/")
                status = row["connection_settings_status"] or {}
                return row["connection_settings_state"] == "applied" and (
                    status.get("last_connection_settings_hash") == written["hash"]
                )

            await asyncio.to_thread(server.wait_for, shown, what=f"{name}'s applied status in the API")
        # The agent the selector does not pick got nothing, and reported nothing.
        await asyncio.sleep(2.5)
        dev = agents["dev-ws"]
        assert dev.applied_connection_settings == {} and not (tmp_path / "dev-ws" / SETTINGS_FILE).exists()
        assert dev.heartbeat_interval == 1.0
        row = await asyncio.to_thread(server.api, f"agents/{uuid.UUID(bytes=dev.instance_uid)}/")
        assert row["connection_settings_status"] is None and row["connection_settings_state"] == ""
    finally:
        for one in agents.values():
            one.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
