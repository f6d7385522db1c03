"""Many agents held at a heartbeat: server processes on their own ports, one load generator each.

    python bench/hold_agents.py --agents 50000 --processes 3 --heartbeat 30 --duration 600 \\
        --database-url postgres://postgres@127.0.0.1:5432/opamp_hold --redis-url redis://127.0.0.1:6379/1

Starts `--processes` server processes of the production profile (deploy/run_production.py,
no nginx: each process on its own port) and one `bench/agents_connect.py` per process, its
share of the agents connecting at `--connect-rate` to that process only, then holding them
at `--heartbeat` for `--duration` seconds after a heartbeat round of warm-up. Each
generator is its own process with its own file limit (the sockets of one process are
bounded by the hard RLIMIT_NOFILE), and each reaches one port, so no generator needs more
than one port range of source ports. `--gc-threshold INDEX=A,B,C` runs that server process
with other GC thresholds (OPAMP_GC_THRESHOLD), for an A/B in the same run.

Prints one JSON object: each generator's summary (RTT percentiles, replies per second, its
server's CPU per heartbeat and memory per agent), RTT percentiles pooled over the
generators' windows (approximated by the worst of each percentile), the servers' GC
summaries and logged long pauses (opamp/runtime.py), and the load average at start and
end. Only loopback: this is a load generator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, the repository root is not on sys.path.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from restart_storm import gc_pauses_from_logs  # noqa: E402

from deploy.run_production import ProductionProfile, ProfileOptions  # noqa: E402


def parse_thresholds(values: Sequence[str]) -> dict[int, str]:
    chosen = {}
    for value in values:
        index, _, threshold = value.partition("=")
        if not threshold or len(threshold.split(",")) != 3:
            raise argparse.ArgumentTypeError(f"--gc-threshold wants INDEX=A,B,C, not {value!r}")
        chosen[int(index)] = threshold
    return chosen


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=600.0, help="measurement window, seconds")
    parser.add_argument("--connect-rate", type=float, default=100.0, help="agents started per second, per generator")
    parser.add_argument("--gc-threshold", action="append", default=[], metavar="INDEX=A,B,C")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "var" / "hold-agents")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if not options.database_url or not options.redis_url:
        build_parser().error("--database-url and --redis-url (or DATABASE_URL, REDIS_URL) are required")
    thresholds = parse_thresholds(options.gc_threshold)
    profile = ProductionProfile(
        ProfileOptions(
            database_url=options.database_url,
            redis_url=options.redis_url,
            workdir=options.workdir,
            processes=options.processes,
            nginx=False,
            celery=False,
            extra_env={
                "OPAMP_AGENT_AUTH": "open",
                "OPAMP_LOG_LEVEL": "WARNING",
                "OPAMP_GC_REPORT_SECONDS": "10",
                "OPAMP_HEARTBEAT_INTERVAL_SECONDS": str(options.heartbeat),
            },
        )
    )
    result: dict[str, Any] = {
        "agents": options.agents,
        "processes": options.processes,
        "heartbeat": options.heartbeat,
        "gc_thresholds": thresholds,
        "load_average_at_start": os.getloadavg(),
    }
    profile.prepare()
    default_threshold = profile.env.get("OPAMP_GC_THRESHOLD")
    for index in range(options.processes):
        if index in thresholds:
            profile.env["OPAMP_GC_THRESHOLD"] = thresholds[index]
        else:
            profile.env.pop("OPAMP_GC_THRESHOLD", None)
            if default_threshold is not None:
                profile.env["OPAMP_GC_THRESHOLD"] = default_threshold
        profile.start_server(index)
    generators = []
    try:
        pids = profile.server_pids()
        for index, (url, count) in enumerate(
            zip(profile.agent_urls, shares(options.agents, options.processes), strict=True)
        ):
            command = [
                sys.executable,
                str(REPO_ROOT / "bench" / "agents_connect.py"),
                "--server",
                url,
                "--agents",
                str(count),
                "--heartbeat",
                str(options.heartbeat),
                "--duration",
                str(options.duration),
                "--connect-rate",
                str(options.connect_rate),
                "--connect-timeout",
                str(max(300.0, count / options.connect_rate * 3)),
                "--server-pid",
                str(pids[index]),
            ]
            output = (profile.log_dir / f"generator-{index}.json").open("w")
            generators.append(
                (subprocess.Popen(command, stdout=output, stderr=subprocess.DEVNULL, cwd=REPO_ROOT), output)
            )
        summaries = []
        for index, (process, output) in enumerate(generators):
            process.wait()
            output.close()
            text = (profile.log_dir / f"generator-{index}.json").read_text()
            summaries.append(json.loads(text) if text.strip() else {"error": f"exit {process.returncode}"})
    finally:
        for process, _ in generators:
            if process.poll() is None:
                process.kill()
        profile.stop()
    result["generators"] = summaries
    result["load_average_at_end"] = os.getloadavg()
    result["gc_pauses"] = gc_pauses_from_logs(profile.log_dir)
    print(json.dumps(result, indent=2))
    return 0 if all(summary.get("all_connected") for summary in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
