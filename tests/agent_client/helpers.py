"""Shared helpers for the agent_client tests: fast settings, running an agent, inspecting messages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent_client import Agent, AgentObserver, AgentSettings, ConfigFile, FileState, report, transport_for_url
from opamp.capabilities import ServerToAgentFlags
from opamp.hashing import config_map_hash
from opamp.proto import opamp_pb2 as pb

# Short enough that no test waits long, long enough that a loaded machine keeps up.
FAST = AgentSettings(heartbeat_interval=0.05, backoff_initial=0.01, backoff_max=0.05, shutdown_timeout=1.0)
# For tests that must not see heartbeats in between the messages they look at.
QUIET = replace(FAST, heartbeat_interval=30.0)

HEARTBEAT_FIELDS = {"instance_uid", "sequence_num", "capabilities"}
FULL_REPORT_FIELDS = HEARTBEAT_FIELDS | {
    "agent_description",
    "health",
    "effective_config",
    "remote_config_status",
}


def field_names(message: pb.AgentToServer) -> set[str]:
    return {descriptor.name for descriptor, _ in message.ListFields()}


def is_full_report(message: pb.AgentToServer) -> bool:
    return field_names(message) >= FULL_REPORT_FIELDS


def attributes(key_values: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in key_values}


def remote_config(files: Mapping[str, ConfigFile]) -> pb.AgentRemoteConfig:
    """An offer of `files` with its canonical hash, as the server builds one."""
    config = report.config_map(files)
    return pb.AgentRemoteConfig(config=config, config_hash=config_map_hash(config.config_map))


def make_agent(
    url: str,
    state_dir: Path,
    settings: AgentSettings = QUIET,
    observer: AgentObserver | None = None,
    **transport_options: Any,
) -> Agent:
    return Agent(
        transport=transport_for_url(url, trust_env=False, **transport_options),
        state=FileState(state_dir),
        settings=settings,
        observer=observer,
    )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    """Run `agent` for the duration of the block, then stop it and wait for it to finish."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        agent.stop()
        async with asyncio.timeout(3):
            await task


def full_state_request() -> pb.ServerToAgent:
    return pb.ServerToAgent(flags=int(ServerToAgentFlags.REPORT_FULL_STATE))


class RetryRecorder(AgentObserver):
    """Remembers each scheduled reconnect delay and lets a test wait for the first."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.errors: list[str] = []
        self.scheduled = asyncio.Event()

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        self.delays.append(retry_in)
        self.errors.append(str(error))
        self.scheduled.set()
