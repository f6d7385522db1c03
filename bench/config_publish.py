"""Publish a configuration to N connected simulated agents; time until all run it.

    python bench/config_publish.py --server ws://127.0.0.1:4330/v1/opamp \
        --api http://127.0.0.1:4330/api/v1 --token TOKEN --agents 2000

Connects N agents (agent_client's simulator, one asyncio loop), creates a configuration
selecting exactly them (a run-specific service.name), publishes a version through the
REST API and measures, from the publish request:
  - agent side: when each agent had applied the new config hash (first to last),
  - server side: when the version's status counts showed every agent as applied.
Loopback targets only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents_connect import distribution_ms, raise_open_file_limit, require_loopback

from agent_client.agent_settings import AgentSettings
from agent_client.simulator import Fleet


async def wait_applied(fleet: Fleet, config_hash: bytes, started: float, timeout: float) -> list[float]:
    """Seconds from `started` at which each agent had `config_hash` applied."""
    applied_at: dict[int, float] = {}
    deadline = started + timeout
    while len(applied_at) < len(fleet.agents) and time.monotonic() < deadline:
        now = time.monotonic()
        for index, agent in enumerate(fleet.agents):
            if index not in applied_at and agent.remote_config.applied_hash == config_hash:
                applied_at[index] = now - started
        await asyncio.sleep(0.02)
    return sorted(applied_at.values())


async def wait_server_counts(
    client: httpx.AsyncClient, path: str, agents: int, started: float, timeout: float
) -> float | None:
    deadline = started + timeout
    while time.monotonic() < deadline:
        counts = (await client.get(path)).json()
        if counts.get("applied") == agents:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def run(*, server: str, api: str, token: str, agents: int, heartbeat: float, timeout: float) -> dict[str, Any]:
    require_loopback(server)
    require_loopback(api)
    raise_open_file_limit(agents)
    run_id = secrets.token_hex(4)
    service = f"bench-publish-{run_id}"
    settings = AgentSettings(identifying_attributes={"service.name": service}, heartbeat_interval=heartbeat)
    headers = {"Authorization": f"Token {token}"}
    async with httpx.AsyncClient(base_url=api.rstrip("/") + "/", headers=headers, timeout=60) as client:
        fleet = Fleet(server=server, count=agents, settings=settings)
        await fleet.start()
        try:
            connect_started = time.monotonic()
            if not await fleet.wait_connected(timeout):
                raise SystemExit(f"only {len(fleet.stats.first_reply_at)} of {agents} agents connected")
            connect_seconds = time.monotonic() - connect_started
            name = f"bench-{run_id}"
            response = await client.post("configurations/", json={"name": name, "selector": f"service.name={service}"})
            response.raise_for_status()
            files = {
                "collector.yaml": {"body": f"# run {run_id}\nreceivers:\n  otlp: {{}}\n", "content_type": "text/yaml"}
            }
            started = time.monotonic()
            response = await client.post(f"configurations/{name}/versions/", json={"files": files, "note": "bench"})
            response.raise_for_status()
            publish_seconds = time.monotonic() - started
            version = response.json()
            config_hash = bytes.fromhex(version["config_hash"])
            applied = await wait_applied(fleet, config_hash, started, timeout)
            server_seen = await wait_server_counts(
                client, f"configurations/{name}/versions/{version['number']}/status/", agents, started, timeout
            )
        finally:
            await fleet.stop()
    return {
        "server": server,
        "agents": agents,
        "connect_seconds": round(connect_seconds, 3),
        "publish_request_seconds": round(publish_seconds, 3),
        "agents_applied": len(applied),
        "all_applied_seconds": round(applied[-1], 3) if len(applied) == agents else None,
        "applied_ms": distribution_ms(applied),
        "server_counts_all_applied_seconds": round(server_seen, 3) if server_seen is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="ws://127.0.0.1:4320/v1/opamp")
    parser.add_argument("--api", default="http://127.0.0.1:4320/api/v1")
    parser.add_argument("--token", required=True)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    options = parser.parse_args()
    result = asyncio.run(
        run(
            server=options.server,
            api=options.api,
            token=options.token,
            agents=options.agents,
            heartbeat=options.heartbeat,
            timeout=options.timeout,
        )
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
