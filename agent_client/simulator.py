"""A fleet of simulated agents in one asyncio loop, for load benchmarks and rollout drills.

Each agent is a real `Agent` with its own transport and state (in memory by default, or a
directory per agent under `state_root`), so the server sees N ordinary agents. `FleetStats`
records what a benchmark needs: when each agent got its first reply and the round trip of
every later (heartbeat) reply. `with_packages` gives a fleet package handling, with a share
of agents that fail every install; simulated agents download each offered file for real
(the bytes are hashed, not kept) unless told to skip it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.packages import PackageSettings
from agent_client.state import AgentState, FileState, MemoryState
from agent_client.transport import TransportKind, transport_for_url
from opamp.proto import opamp_pb2 as pb


class FleetStats(AgentObserver):
    """What the fleet's agents saw, timed with `time.monotonic()` (the event loop's clock)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.started_at = time.monotonic()
        # When each agent was first admitted: its first reply that was not an error
        # response (a refusal, e.g. admission pacing's UNAVAILABLE, admits nobody).
        self.first_reply_at: dict[Agent, float] = {}
        self.refusals = 0
        # (when the reply arrived, round trip in seconds) for every reply after a
        # session's first: in steady state those answer heartbeats.
        self.round_trips: list[tuple[float, float]] = []
        self.replies = 0
        self.connections = 0
        self.disconnects = 0
        # Restart commands carried out (each agent reconnects as a new process).
        self.restarts = 0
        self.errors: Counter[str] = Counter()
        self.all_answered = asyncio.Event()
        self._awaiting_first: set[Agent] = set()
        # Agents whose current session has had a reply (for the progress line).
        self.online: set[Agent] = set()

    def on_connected(self, agent: Agent) -> None:
        self.connections += 1
        self._awaiting_first.add(agent)

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        now = time.monotonic()
        self.replies += 1
        if reply.HasField("error_response"):
            self.refusals += 1
            self.online.discard(agent)
            return
        self.online.add(agent)
        if agent in self._awaiting_first:
            self._awaiting_first.discard(agent)
            self.first_reply_at.setdefault(agent, now)
            if len(self.first_reply_at) >= self.expected:
                self.all_answered.set()
        elif round_trip is not None:
            self.round_trips.append((now, round_trip))

    def on_restart(self, agent: Agent) -> None:
        self.restarts += 1
        self.online.discard(agent)

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        self.disconnects += 1
        self.online.discard(agent)
        self.errors[str(error)[:120]] += 1


def spread_evenly(count: int, fraction: float) -> set[int]:
    """`fraction` of the indexes 0..count-1, spread across the range (not the first ones),
    so a failing share lands in every stage's cohort of a rollout alike."""
    if not 0 <= fraction <= 1:
        raise ValueError("fraction must be between 0 and 1")
    return {index for index in range(count) if int((index + 1) * fraction) > int(index * fraction)}


def with_packages(
    settings_for: Callable[[int], AgentSettings],
    *,
    count: int,
    packages: PackageSettings,
    fail_fraction: float = 0.0,
    skip_download_fraction: float = 0.0,
) -> Callable[[int], AgentSettings]:
    """`settings_for` with package handling for each of `count` agents. `fail_fraction` of
    them (spread evenly) fail every install, reported InstallFailed; `skip_download_fraction`
    of them (spread evenly too) never download the file, the others download it for real."""
    failing = spread_evenly(count, fail_fraction)
    skipping = spread_evenly(count, skip_download_fraction)
    variants = {
        (fail, skip): replace(
            packages, fail_install=fail or packages.fail_install, download=packages.download and not skip
        )
        for fail in (False, True)
        for skip in (False, True)
    }
    return lambda index: replace(settings_for(index), packages=variants[(index in failing, index in skipping)])


_PACKAGE_STATUS_NAMES = {
    pb.PackageStatusEnum_Installed: "installed",
    pb.PackageStatusEnum_InstallPending: "pending",
    pb.PackageStatusEnum_Installing: "installing",
    pb.PackageStatusEnum_InstallFailed: "failed",
    pb.PackageStatusEnum_Downloading: "downloading",
}


def package_counts(fleet: Fleet) -> Counter[str]:
    """How many packages of the fleet's agents are in each status."""
    return Counter(
        _PACKAGE_STATUS_NAMES.get(status.status, "unknown")
        for agent in fleet.agents
        for status in agent.package_statuses.values()
    )


_STATUS_NAMES = {
    pb.RemoteConfigStatuses_APPLIED: "applied",
    pb.RemoteConfigStatuses_APPLYING: "applying",
    pb.RemoteConfigStatuses_FAILED: "failed",
}


def progress_line(fleet: Fleet) -> str:
    """One line on how the fleet is doing: sessions, and the remote config states by hash."""
    by_config: Counter[tuple[str, str]] = Counter()
    for agent in fleet.agents:
        record = agent.remote_config
        if record.last_hash:
            by_config[(record.last_hash.hex()[:8], _STATUS_NAMES.get(record.status, "received"))] += 1
    stats = fleet.stats
    parts = [f"{len(stats.online)}/{len(fleet.agents)} connected"]
    for (config_hash, status), count in sorted(by_config.items()):
        parts.append(f"{config_hash} {status} {count}")
    if not by_config:
        parts.append("no config offered yet")
    if packages := package_counts(fleet):
        parts.append("packages " + ", ".join(f"{status} {count}" for status, count in sorted(packages.items())))
        downloaded = sum(agent.package_bytes_downloaded for agent in fleet.agents)
        parts.append(f"{downloaded / 1e6:.1f} MB downloaded")
    parts.append(f"{stats.disconnects} disconnects")
    if stats.restarts:
        parts.append(f"{stats.restarts} restarts")
    return " | ".join(parts)


class Fleet:
    """N agents against one server (or several); `async with Fleet(...)` starts and stops them all."""

    def __init__(
        self,
        *,
        server: str | Sequence[str],
        count: int,
        settings: AgentSettings | None = None,
        settings_for: Callable[[int], AgentSettings] | None = None,
        transport: TransportKind | None = None,
        headers: Mapping[str, str] | None = None,
        state_root: Path | None = None,
        connect_rate: float = 0.0,
        ws_ping_interval: float | None = None,
    ) -> None:
        """`settings_for(index)` overrides `settings` per agent (e.g. a failing cohort);
        `connect_rate` is agents started per second (0: all at once); keepalive pings are
        off by default because heartbeats already prove liveness. Several server URLs
        (processes of one server) are given to the agents round robin, as a load balancer
        would spread them."""
        if count < 1:
            raise ValueError("a fleet needs at least one agent")
        servers = [server] if isinstance(server, str) else list(server)
        if not servers:
            raise ValueError("a fleet needs at least one server URL")
        self.server = servers[0]
        self.servers = servers
        self.connect_rate = connect_rate
        self.stats = FleetStats(count)
        shared = settings or AgentSettings()
        self.agents: list[Agent] = []
        for index in range(count):
            state: AgentState = FileState(state_root / f"agent-{index:05d}") if state_root else MemoryState()
            self.agents.append(
                Agent(
                    transport=transport_for_url(
                        servers[index % len(servers)],
                        kind=transport,
                        headers=headers,
                        trust_env=False,
                        ping_interval=ws_ping_interval,
                    ),
                    state=state,
                    settings=settings_for(index) if settings_for else shared,
                    observer=self.stats,
                    name=f"agent-{index:05d}",
                )
            )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every agent; with a connect rate this returns when the last one started."""
        self.stats.started_at = time.monotonic()
        for index, agent in enumerate(self.agents):
            self._tasks.append(asyncio.create_task(agent.run(), name=agent.name))
            if self.connect_rate > 0:
                # Sleep to the agent's slot rather than a fixed gap, so timer lateness
                # does not add up over thousands of agents.
                slot = self.stats.started_at + (index + 1) / self.connect_rate
                await asyncio.sleep(max(0.0, slot - time.monotonic()))

    async def wait_connected(self, timeout: float) -> bool:
        """True once every agent has had a first reply; False after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self.stats.all_answered.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every agent (each sends agent_disconnect); cancel what is left at `timeout`."""
        for agent in self.agents:
            agent.stop()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # A clean goodbye reports no disconnect to the observer: every agent is offline now.
        self.stats.online.clear()

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
