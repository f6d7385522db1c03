"""Restart under load: N agents connected, every server process SIGKILLed and started again.

    python bench/restart_storm.py --agents 2000 \\
        --database-url postgres://postgres@127.0.0.1:5432/opamp_bench --redis-url redis://127.0.0.1:6379/1

Starts the production profile itself (one daphne process as the systemd unit runs it, or
with `--processes N` that many behind nginx, as `deploy/run_production.py` starts them),
connects `--agents` simulated agents (agent_client's simulator, at `--connect-rate`),
waits until every agent has been admitted (a reply other than UNAVAILABLE), then kills
every server process with SIGKILL and starts them again. Prints one JSON object: seconds
until every agent had a reply on a new connection, failed connection attempts meanwhile
(every session that ended before the agent was back, beyond the one the kill ended), the
new processes' CPU seconds (total and after they listened) per reconnected agent, and
resident memory before the kill and once all were back. Only loopback: this is a load
generator. Exit status 1 when not every agent came back within `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, the repository root is not on sys.path.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from agents_connect import distribution_ms, raise_open_file_limit, require_loopback  # noqa: E402

from agent_client.agent import Agent  # noqa: E402
from agent_client.agent_settings import AgentSettings  # noqa: E402
from agent_client.simulator import Fleet, FleetStats  # noqa: E402
from deploy.run_production import ProductionProfile, ProfileOptions, process_cpu_seconds, process_rss_bytes  # noqa: E402
from opamp.proto import opamp_pb2 as pb  # noqa: E402


class RestartStats(FleetStats):
    """FleetStats plus, from `mark()` on, each agent's first reply and every failed attempt."""

    def __init__(self, expected: int) -> None:
        super().__init__(expected)
        self.marked_at: float | None = None
        self.listening_at: float | None = None
        self.failed_while_listening = 0
        self.back_at: dict[Agent, float] = {}
        self.ended_after_mark: Counter[Agent] = Counter()
        self.errors_after_mark: Counter[str] = Counter()
        self.unavailable_answers = 0
        self.all_back = asyncio.Event()
        # Before the kill: the agents admitted and inventoried (a reply other than
        # UNAVAILABLE). A refusal is a reply too, and a fleet counted connected on it was
        # killed with most of its agents never inventoried: they came back as new agents.
        self.admitted_before: set[Agent] = set()
        self.all_admitted = asyncio.Event()
        self._new_session: set[Agent] = set()

    def mark(self) -> None:
        self.marked_at = time.monotonic()

    def on_connected(self, agent: Agent) -> None:
        super().on_connected(agent)
        if self.marked_at is not None:
            self._new_session.add(agent)

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        super().on_reply(agent, reply, round_trip)
        unavailable = pb.ServerErrorResponseType_Unavailable
        refused = reply.HasField("error_response") and reply.error_response.type == unavailable
        if self.marked_at is None and not refused:
            self.admitted_before.add(agent)
            if len(self.admitted_before) >= self.expected:
                self.all_admitted.set()
        if agent not in self._new_session:
            return
        if refused:
            self.unavailable_answers += 1
            return
        self._new_session.discard(agent)
        self.back_at.setdefault(agent, time.monotonic())
        if len(self.back_at) >= self.expected:
            self.all_back.set()

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        super().on_disconnected(agent, error, retry_in)
        self._new_session.discard(agent)
        if self.marked_at is not None and agent not in self.back_at:
            self.ended_after_mark[agent] += 1
            self.errors_after_mark[str(error)[:100]] += 1
            if self.listening_at is not None:
                self.failed_while_listening += 1


def gc_pauses_from_logs(log_dir: Path) -> dict[str, Any]:
    """The server processes' GC figures, from their logs (opamp/runtime.py's GcPauseMonitor):
    the last summary of each process (by pid) and every pause logged over the threshold."""
    summaries: dict[int, dict[str, Any]] = {}
    long_pauses: list[str] = []
    for log in sorted(log_dir.glob("server-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if " opamp.gc gc pauses {" in line:
                summary = json.loads(line.partition(" gc pauses ")[2])
                summaries[summary["pid"]] = summary
            elif " opamp.gc gc pause of " in line:
                long_pauses.append(f"{log.name}: {line.partition(' opamp.gc ')[2]}")
    return {"per_process": list(summaries.values()), "long_pauses": long_pauses}


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy on the restarted process, until SIGINT (raw collapsed stacks: bench/profile_layers.py)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--gil",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_storm(
    *,
    profile: ProductionProfile,
    agents: int,
    connect_rate: float,
    heartbeat: float,
    timeout: float,
    connect_timeout: float,
    profile_output: Path | None = None,
) -> dict[str, Any]:
    settings = AgentSettings(
        non_identifying_attributes={"simulated": "true"}, heartbeat_interval=heartbeat, shutdown_timeout=10.0
    )
    fleet = Fleet(server=profile.agent_urls, count=agents, settings=settings, connect_rate=connect_rate)
    stats = RestartStats(agents)
    for agent in fleet.agents:
        agent._observer = stats
        if profile.agent_ca_file is not None:
            agent.transport.ca_file = profile.agent_ca_file  # nginx's certificate, made for this machine
    fleet.stats = stats
    gc.collect()
    gc.freeze()
    result: dict[str, Any] = {
        "agents": agents,
        "processes": profile.options.processes,
        "nginx": profile.uses_nginx,
        "server": profile.options.server,
        "load_average_at_start": os.getloadavg(),
    }
    started_at = time.monotonic()
    try:
        await fleet.start()
        try:
            async with asyncio.timeout(connect_timeout):
                await stats.all_admitted.wait()
        except TimeoutError:
            pass
        result["connected_before"] = len(stats.admitted_before)
        result["seconds_to_connect"] = round(time.monotonic() - started_at, 2)
        if not stats.all_admitted.is_set():
            result["error"] = "not every agent was admitted before the restart"
            return result
        await asyncio.sleep(heartbeat)  # a heartbeat round, so every row is flushed
        pids = profile.server_pids()
        result["load_average_before_kill"] = os.getloadavg()
        result["rss_mb_before"] = round(sum(process_rss_bytes(pid) for pid in pids) / 2**20, 1)
        stats.mark()
        killed_at = time.monotonic()
        await asyncio.to_thread(profile.kill_servers)
        await asyncio.to_thread(profile.start_servers)
        listening_at = stats.listening_at = time.monotonic()
        pids = profile.server_pids()
        cpu_at_listen = sum(process_cpu_seconds(pid) for pid in pids)
        sampler = start_py_spy(pids[0], profile_output) if profile_output is not None else None
        try:
            async with asyncio.timeout(timeout):
                await stats.all_back.wait()
        except TimeoutError:
            pass
        done_at = time.monotonic()
        cpu_total = sum(process_cpu_seconds(pid) for pid in pids)
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            await asyncio.to_thread(sampler.wait, 30)
        back = len(stats.back_at)
        delays = [at - killed_at for at in stats.back_at.values()]
        result.update(
            all_back=back == agents,
            back=back,
            seconds_until_all_back=round(done_at - killed_at, 2) if back == agents else None,
            seconds_to_listen=round(listening_at - killed_at, 2),
            back_after_kill_ms=distribution_ms(delays),
            failed_attempts=sum(stats.ended_after_mark.values()) - len(stats.ended_after_mark),
            failed_attempts_once_listening=stats.failed_while_listening,
            unavailable_answers=stats.unavailable_answers,
            top_errors=dict(stats.errors_after_mark.most_common(5)),
            server_cpu_seconds=round(cpu_total, 2),
            server_cpu_seconds_after_listen=round(cpu_total - cpu_at_listen, 2),
            cpu_ms_per_reconnect=round((cpu_total - cpu_at_listen) / back * 1000, 2) if back else None,
            rss_mb_after=round(sum(process_rss_bytes(pid) for pid in pids) / 2**20, 1),
            measured_seconds=round(done_at - killed_at, 2),
            load_average_at_end=os.getloadavg(),
        )
        return result
    finally:
        await fleet.stop(timeout=10.0)
        gc.unfreeze()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--processes", type=int, default=1, help="daphne processes; more than one runs nginx")
    parser.add_argument("--connect-rate", type=float, default=100.0, help="agents started per second before")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds between heartbeats")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every agent after")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        help="seconds to wait for every agent to be admitted before the kill (default: agents / 25, at least 180;"
        " new agents are admitted at 75/s per process by default)",
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "var" / "restart-storm")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the (first) restarted process until all are back; raw stacks to this file"
    )
    parser.add_argument(
        "--server-root", type=Path, help="run the server from this source tree (e.g. `git archive` of a baseline)"
    )
    parser.add_argument("--log-level", default="ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not options.database_url or not options.redis_url:
        build_parser().error("--database-url and --redis-url (or DATABASE_URL, REDIS_URL) are required")
    profile = ProductionProfile(
        ProfileOptions(
            database_url=options.database_url,
            redis_url=options.redis_url,
            workdir=options.workdir,
            processes=options.processes,
            nginx=options.processes > 1,
            celery=False,
            server_root=options.server_root,
            # A GC summary every 10 s, so the last one before the kill is recent.
            extra_env={"OPAMP_AGENT_AUTH": "open", "OPAMP_LOG_LEVEL": "WARNING", "OPAMP_GC_REPORT_SECONDS": "10"},
        )
    )
    for url in profile.agent_urls:
        require_loopback(url)
    raise_open_file_limit(options.agents * 2)
    profile.prepare()
    profile.start()
    try:
        summary = asyncio.run(
            run_storm(
                profile=profile,
                agents=options.agents,
                connect_rate=options.connect_rate,
                heartbeat=options.heartbeat,
                timeout=options.timeout,
                connect_timeout=options.connect_timeout or max(180.0, options.agents / 25),
                profile_output=options.profile,
            )
        )
    finally:
        profile.stop()
    summary["gc_pauses"] = gc_pauses_from_logs(profile.log_dir)
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("all_back") else 1


if __name__ == "__main__":
    sys.exit(main())
