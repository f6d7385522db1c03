"""Two daphne processes behind a real nginx: a process killed with SIGKILL and started again
gets agents again within seconds.

With nginx's default upstream failure settings (max_fails=1 fail_timeout=10s) every refused
connection marks a process unavailable for ten seconds, so a process that restarts while
agents keep reconnecting stays marked; when the other process then goes down, nginx has no
live upstream and answers 502 until the mark expires. The rendered configuration never marks
a process (max_fails=0) and passes a refused connection to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent_client.agent import Agent
from agent_client.agent_settings import AgentSettings
from agent_client.simulator import Fleet, FleetStats
from opamp.proto import opamp_pb2 as pb
from tests.deploy.nginx import Nginx
from tests.deploy.pki import front_files
from tests.support.live_server import REPO_ROOT, LiveOpampServer

pytestmark = [pytest.mark.live_server]

AGENTS = 30
BACK_WITHIN_SECONDS = 8.0


class Reconnects(FleetStats):
    """FleetStats plus the agents that had a reply on a connection opened after `mark()`."""

    def __init__(self, expected: int) -> None:
        super().__init__(expected)
        self.marked_at: float | None = None
        self.back: dict[Agent, float] = {}
        self.all_back = asyncio.Event()
        self._fresh: set[Agent] = set()

    def mark(self) -> None:
        self.marked_at = time.monotonic()
        self.back.clear()
        self.all_back.clear()

    def on_connected(self, agent: Agent) -> None:
        super().on_connected(agent)
        if self.marked_at is not None:
            self._fresh.add(agent)

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        super().on_reply(agent, reply, round_trip)
        if agent in self._fresh:
            self._fresh.discard(agent)
            self.back.setdefault(agent, time.monotonic())
            if len(self.back) == self.expected:
                self.all_back.set()


@pytest.fixture
def two_processes_behind_nginx(tmp_path: Path, nginx_binary: str) -> Iterator[tuple[LiveOpampServer, Nginx, Path]]:
    files = front_files(tmp_path, "Scale-out")
    server = LiveOpampServer(tmp_path / "server", processes=2, extra_env=files.server_env())
    server.manage("write_crl")
    upstreams = [f"127.0.0.1:{port}" for port in server.ports]
    nginx = Nginx.in_front(nginx_binary, tmp_path / "nginx", files, upstream=upstreams)
    try:
        server.start()
        nginx.start()
        yield server, nginx, files.server_ca
    finally:
        nginx.stop()
        server.close()


def kill(server: LiveOpampServer, index: int) -> None:
    process = server.processes[index]
    process.send_signal(signal.SIGKILL)
    process.wait()


def start_again(server: LiveOpampServer, index: int) -> None:
    """The same server command on the same port, as systemd's Restart= would run it."""
    port = server.ports[index]
    log = (server.workdir / f"restarted-{index}.log").open("ab")
    process = subprocess.Popen(
        server.command(port),
        cwd=REPO_ROOT,
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server.processes[index] = process
    server._wait_listening(process, port)


async def probe(url: str, server_ca: Path, stop: asyncio.Event) -> None:
    """Requests through nginx every 50 ms: each new one goes to the next process in turn."""
    context = ssl.create_default_context(cafile=str(server_ca))
    async with httpx.AsyncClient(verify=context, timeout=5) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                await client.get(url, headers={"Connection": "close"})
            await asyncio.sleep(0.05)


async def test_a_process_killed_and_started_again_gets_agents_again_within_seconds(
    two_processes_behind_nginx: tuple[LiveOpampServer, Nginx, Path],
) -> None:
    server, nginx, server_ca = two_processes_behind_nginx
    settings = AgentSettings(heartbeat_interval=1.0, backoff_initial=0.1, backoff_max=0.5, shutdown_timeout=5.0)
    fleet = Fleet(server=f"wss://127.0.0.1:{nginx.port}/v1/opamp", count=AGENTS, settings=settings)
    stats = Reconnects(AGENTS)
    fleet.stats = stats
    for agent in fleet.agents:
        agent._observer = stats
        agent.transport.ca_file = server_ca  # type: ignore[union-attr]
    await fleet.start()
    try:
        assert await fleet.wait_connected(30), f"{len(stats.first_reply_at)} of {AGENTS} connected"
        # Process 1 dies and starts again while requests keep arriving (a fleet's polls
        # and reconnects would), so nginx sees it refuse connections until it listens.
        probing = asyncio.Event()
        prober = asyncio.create_task(probe(f"{nginx.base_url}/v1/opamp", server_ca, probing))
        await asyncio.to_thread(kill, server, 1)
        await asyncio.to_thread(start_again, server, 1)
        probing.set()
        await prober
        # Now process 0 dies: every agent must find the restarted process 1.
        stats.mark()
        await asyncio.to_thread(kill, server, 0)
        try:
            async with asyncio.timeout(BACK_WITHIN_SECONDS * 3):
                await stats.all_back.wait()
        except TimeoutError:
            pass
        assert len(stats.back) == AGENTS, f"{len(stats.back)} of {AGENTS} back: {nginx.log()[-2000:]}"
        assert stats.marked_at is not None
        slowest = max(stats.back.values()) - stats.marked_at
        assert slowest < BACK_WITHIN_SECONDS, f"the last agent was back after {slowest:.1f} s"
    finally:
        await fleet.stop(timeout=5)
