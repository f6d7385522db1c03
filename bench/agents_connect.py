"""Connect N simulated agents to a local OpAMP server and measure how it keeps up.

    python bench/agents_connect.py --server ws://127.0.0.1:4320/v1/opamp \\
        --agents 2000 --heartbeat 5 --duration 30

With `--server-pid` (a server process on this machine), the summary adds that process's CPU
time spent while the agents connected, its resident memory growth per connected agent, and
its CPU per heartbeat reply over the measurement window.

Prints one JSON object: how long until every agent was connected and had its first reply
(`connect_seconds`), then, over a `--duration` window, heartbeat replies per second and
their round-trip latency percentiles. The window opens `--warmup` seconds (default: one
heartbeat interval) after the last first reply, so the backlog of the connect burst is not
counted as heartbeat throughput. Agents send agent_disconnect at the end. The run is bounded
(`--connect-timeout` + `--warmup` + `--duration` + shutdown), and only loopback servers are
accepted: this is a load generator. Exit status 1 when not every agent got a first reply.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Run as a script, the repository root is not on sys.path.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from agent_client.agent_settings import AgentSettings  # noqa: E402
from agent_client.cli import parse_header  # noqa: E402
from agent_client.simulator import Fleet  # noqa: E402
from agent_client.transport import TransportKind  # noqa: E402

SHUTDOWN_TIMEOUT = 10.0
# Sockets the process needs besides one per agent (stdio, logs, the loop's self-pipe).
_SPARE_FILES = 256


def require_loopback(server: str) -> None:
    host = urlsplit(server).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing {server!r}: the benchmark only targets loopback addresses (127.0.0.1)")


def raise_open_file_limit(agents: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = agents + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


class ServerProcess:
    """CPU time and resident memory of a local server process, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise ValueError(f"no VmRSS for process {self.pid}")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def distribution_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50) * 1000, 3),
        "p90": round(percentile(ordered, 90) * 1000, 3),
        "p99": round(percentile(ordered, 99) * 1000, 3),
        "p99.9": round(percentile(ordered, 99.9) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


async def run_bench(
    *,
    server: str,
    agents: int,
    heartbeat: float,
    duration: float,
    warmup: float | None = None,
    transport: TransportKind | None = None,
    connect_rate: float = 0.0,
    connect_timeout: float = 60.0,
    headers: dict[str, str] | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    require_loopback(server)
    process = ServerProcess(server_pid) if server_pid else None
    if warmup is None:
        warmup = heartbeat
    settings = AgentSettings(
        non_identifying_attributes={"simulated": "true"},
        heartbeat_interval=heartbeat,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    fleet = Fleet(
        server=server,
        count=agents,
        settings=settings,
        transport=transport,
        headers=headers,
        connect_rate=connect_rate,
    )
    # The generator's own collector pauses would show up as server latency; the agents
    # are long-lived, so move them out of the collector's sight once built.
    gc.collect()
    gc.freeze()
    stats = fleet.stats
    before = (process.cpu_seconds(), process.rss_kib()) if process else None
    try:
        await fleet.start()
        all_connected = await fleet.wait_connected(max(0.0, connect_timeout - (time.monotonic() - stats.started_at)))
        connected = (process.cpu_seconds(), process.rss_kib()) if process else None
        first_replies = [at - stats.started_at for at in stats.first_reply_at.values()]
        await asyncio.sleep(warmup)
        window_start = time.monotonic()
        window_cpu_start = process.cpu_seconds() if process else None
        await asyncio.sleep(duration)
        window_end = time.monotonic()
        window_cpu = process.cpu_seconds() - window_cpu_start if process and window_cpu_start is not None else None
    finally:
        await fleet.stop(timeout=SHUTDOWN_TIMEOUT)
        gc.unfreeze()

    round_trips = [seconds for at, seconds in stats.round_trips if window_start <= at <= window_end]
    window = window_end - window_start
    return {
        "server": server,
        "transport": "http" if fleet.agents[0].transport.polls else "ws",
        "agents": agents,
        "heartbeat_seconds": heartbeat,
        "duration_seconds": duration,
        "warmup_seconds": warmup,
        "connect_rate": connect_rate,
        "all_connected": all_connected,
        "connected_agents": len(stats.first_reply_at),
        "connect_seconds": round(max(first_replies), 3) if all_connected else None,
        "first_reply_ms": distribution_ms(first_replies),
        "window_seconds": round(window, 3),
        "heartbeat_replies": len(round_trips),
        "replies_per_second": round(len(round_trips) / window, 1) if window > 0 else None,
        "latency_ms": distribution_ms(round_trips),
        "reconnects": stats.disconnects,
        "top_errors": dict(stats.errors.most_common(5)),
        "server_process": server_costs(before, connected, len(stats.first_reply_at)),
        # The server's CPU over the heartbeat window, per reply it sent in that window.
        "server_cpu_us_per_heartbeat": (
            round(window_cpu / len(round_trips) * 1e6, 1) if window_cpu is not None and round_trips else None
        ),
    }


def server_costs(
    before: tuple[float, int] | None, connected: tuple[float, int] | None, agents: int
) -> dict[str, float] | None:
    """The server's CPU per connect and memory per connection over the connect phase."""
    if before is None or connected is None or agents == 0:
        return None
    cpu = connected[0] - before[0]
    return {
        "cpu_seconds_while_connecting": round(cpu, 2),
        "cpu_ms_per_connect": round(cpu / agents * 1000, 2),
        "rss_mb_before": round(before[1] / 1024, 1),
        "rss_mb_connected": round(connected[1] / 1024, 1),
        "kib_per_connection": round((connected[1] - before[1]) / agents, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="ws://127.0.0.1:4320/v1/opamp")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--duration", type=float, default=30.0, help="measurement window, seconds")
    parser.add_argument(
        "--warmup", type=float, help="seconds between the last first reply and the window (default: --heartbeat)"
    )
    parser.add_argument("--transport", choices=("ws", "http"), help="default: from the URL scheme")
    parser.add_argument("--connect-rate", type=float, default=0.0, help="agents started per second (0: all at once)")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument(
        "--header",
        action="append",
        type=parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="e.g. 'Authorization: Bearer X'",
    )
    parser.add_argument("--server-pid", type=int, help="a local server process to measure (CPU, memory)")
    parser.add_argument("--log-level", default="ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if options.agents < 1 or options.heartbeat <= 0 or options.duration < 0 or (options.warmup or 0) < 0:
        build_parser().error("--agents must be >= 1, --heartbeat > 0, --duration and --warmup >= 0")
    try:
        require_loopback(options.server)
    except ValueError as error:
        build_parser().error(str(error))
    raise_open_file_limit(options.agents)
    summary = asyncio.run(
        run_bench(
            server=options.server,
            agents=options.agents,
            heartbeat=options.heartbeat,
            duration=options.duration,
            warmup=options.warmup,
            transport=options.transport,
            connect_rate=options.connect_rate,
            connect_timeout=options.connect_timeout,
            headers=dict(options.header),
            server_pid=options.server_pid,
        )
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["all_connected"] else 1


if __name__ == "__main__":
    sys.exit(main())
