"""The seed's production case as a drill: N simulated agents, 1% -> 10% -> 100% with compressed
holds, advanced by a real Celery worker with beat; optionally a failing share of the fleet.

    python bench/rollout_drill.py --agents 18000 --failing 0.0002 --hold 5
    python bench/rollout_drill.py --agents 18000 --failing 0.01 --hold 5     # must roll back

Starts its own server processes (daphne; `--server-processes N` starts N on ports of their
own, sharing the database and the Redis channel layer, and the simulated agents are spread
over them round robin as a load balancer would) and a Celery worker+beat on a fresh database: the
production profile when OPAMP_TEST_PROFILE=production with DATABASE_URL/REDIS_URL set
(PostgreSQL, Redis), the embedded default otherwise. Failing agents are drawn uniformly at
random (seeded) and reject the candidate. Reports per stage how long it lasted, the
end-to-end time, the failure rate observed, and for a rollback how long until every agent
ran the stable version again (agent side). Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import secrets
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agents_connect import raise_open_file_limit  # noqa: E402

from agent_client.agent_settings import AgentSettings  # noqa: E402
from agent_client.simulator import Fleet  # noqa: E402
from tests.support.live_server import LiveOpampServer  # noqa: E402

MARKER = b"drill-candidate"
STABLE = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
CANDIDATE = {"collector.yaml": {"body": "# drill-candidate\nreceivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


def applied_count(fleet: Fleet, config_hash: str) -> int:
    return sum(agent.remote_config.applied_hash.hex() == config_hash for agent in fleet.agents)


async def wait_until(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return False


def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def drill(options: argparse.Namespace) -> dict[str, Any]:
    raise_open_file_limit(options.agents)
    workdir = Path(tempfile.mkdtemp(prefix="opamp-drill-"))
    server = LiveOpampServer(
        workdir / "server",
        extra_env={
            "OPAMP_ROLLOUT_TICK_SECONDS": "1",
            "OPAMP_HEARTBEAT_FLUSH_SECONDS": "2",
            # The server judges presence by the interval agents heartbeat at.
            "OPAMP_HEARTBEAT_INTERVAL_SECONDS": str(options.heartbeat),
        },
        # With several processes, one more serves the operator's API alone: behind a 30 s
        # client timeout, a publish queued behind thousands of agents' reports timed out.
        processes=options.server_processes + (1 if options.server_processes > 1 else 0),
        daphne_args=[
            "--ping-interval",
            str(options.ping_interval),
            "--ping-timeout",
            str(options.ping_timeout),
            "--websocket_connect_timeout",
            "30",
        ],
    )
    server.start()
    server.start_celery()
    if options.load_cpus:
        # After the servers started: they keep every core, only this load generator moves.
        os.sched_setaffinity(0, {int(cpu) for cpu in options.load_cpus.split(",")})
    rng = random.Random(options.seed)
    failing = set(rng.sample(range(options.agents), round(options.agents * options.failing)))
    service = f"drill-{secrets.token_hex(3)}"

    def settings_for(index: int) -> AgentSettings:
        return AgentSettings(
            identifying_attributes={"service.name": service},
            heartbeat_interval=options.heartbeat,
            fail_if_contains=MARKER if index in failing else None,
            # Retrying a refused handshake after half a second (the agents' default) turns
            # a slow start into a reconnect storm on a saturated machine.
            backoff_initial=options.backoff,
            backoff_max=max(options.backoff, 60.0),
        )

    agent_urls = server.ws_urls[1:] if options.server_processes > 1 else server.ws_urls
    fleet = Fleet(server=agent_urls, count=options.agents, settings_for=settings_for, connect_rate=options.connect_rate)
    # The agents live for the whole run: keep the collector from walking them (its pauses
    # would show up as server latency), as bench/agents_connect.py does.
    gc.collect()
    gc.freeze()
    result: dict[str, Any] = {
        "agents": options.agents,
        "failing_agents": len(failing),
        "hold_seconds": options.hold,
        "server_processes": options.server_processes,
        "connect_rate": options.connect_rate,
        "heartbeat_seconds": options.heartbeat,
        "ping_interval_seconds": options.ping_interval,
        "apply_timeout_seconds": options.apply_timeout,
    }
    progress = asyncio.create_task(report_progress(fleet))
    try:
        started = time.monotonic()
        await fleet.start()
        if not await fleet.wait_connected(options.agents / max(options.connect_rate, 1) + 300):
            raise SystemExit(f"only {len(fleet.stats.first_reply_at)} agents connected")
        result["connect_seconds"] = round(time.monotonic() - started, 1)
        result["reconnects_during_connect"] = fleet.stats.disconnects
        name = f"drill-{service}"
        server.api_post("configurations/", {"name": name, "selector": f"service.name={service}"})
        stable = server.api_post(f"configurations/{name}/versions/", {"files": STABLE})
        t0 = time.monotonic()
        await wait_until(lambda: applied_count(fleet, stable["config_hash"]) == options.agents, 900)
        result["stable_publish_all_applied_seconds"] = round(time.monotonic() - t0, 1)
        candidate = server.api_post(f"configurations/{name}/versions/", {"files": CANDIDATE, "activate": False})
        stages = [
            {"percent": 1, "hold_seconds": options.hold},
            {"percent": 10, "hold_seconds": options.hold},
            {"percent": 100},
        ]
        rollout = server.api_post(
            "rollouts/",
            {
                "configuration": name,
                "candidate_version": candidate["number"],
                "stages": stages,
                "max_failure_rate": options.budget,
                "apply_timeout_seconds": options.apply_timeout,
            },
        )
        t0 = time.monotonic()
        server.api_post(f"rollouts/{rollout['id']}/start/", {})

        def finished() -> bool:
            try:
                return server.api(f"rollouts/{rollout['id']}/")["state"] in {"succeeded", "rolled_back", "paused"}
            except httpx.HTTPError as error:
                # A loaded machine answers a poll late or with a 500 (e.g. PostgreSQL out
                # of connections); the next poll asks again.
                print(f"poll failed: {error}", file=sys.stderr, flush=True)
                return False

        await wait_until(finished, 1800, interval=1.0)
        result["end_to_end_seconds"] = round(time.monotonic() - t0, 1)
        detail = server.api(f"rollouts/{rollout['id']}/")
        events = server.api(f"rollouts/{rollout['id']}/events/")
        result["final_state"] = detail["state"]
        times = [(e["kind"], e["stage_index"], stamp(e["at"])) for e in events]
        begin = next(t for kind, _, t in times if kind == "started")
        marks = [(0, begin)] + [(stage, t) for kind, stage, t in times if kind == "stage_started"]
        end = next((t for kind, _, t in times if kind in {"succeeded", "budget_exceeded", "paused"}), times[-1][2])
        result["stage_seconds"] = {
            f"stage {stage}": round((marks[i + 1][1] if i + 1 < len(marks) else end) - t, 1)
            for i, (stage, t) in enumerate(marks)
        }
        breach_event = next((e for e in events if e["kind"] == "budget_exceeded"), None)
        if breach_event is not None:
            # After a rollback the agents report the stable hash again, so the rate the gate
            # acted on is the one recorded with the breach.
            result["failure_rate_observed"] = breach_event["counts"]["failure_rate"]
            result["failed_agents_observed"] = breach_event["counts"]["failed"] + breach_event["counts"]["unhealthy"]
        else:
            counts = [s["counts"] for s in detail["stages"] if s["counts"]]
            failed = sum(c["failed"] + c["unhealthy"] for c in counts)
            reached = sum(c["reachable"] for c in counts)
            result["failure_rate_observed"] = round(failed / reached, 6) if reached else None
            result["failed_agents_observed"] = failed
        if detail["state"] == "rolled_back" or any(kind == "budget_exceeded" for kind, _, _ in times):
            breach = next(t for kind, _, t in times if kind == "budget_exceeded")
            result["breach_stage"] = next(stage for kind, stage, _ in times if kind == "budget_exceeded")
            await wait_until(lambda: applied_count(fleet, stable["config_hash"]) == options.agents, 900)
            result["time_to_full_rollback_seconds"] = round(time.time() - breach, 1)
            result["agents_on_stable_after_rollback"] = applied_count(fleet, stable["config_hash"])
        else:
            result["agents_on_candidate_at_end"] = applied_count(fleet, candidate["config_hash"])
            # The gate may finish before the last answers are in (timed-out agents leave
            # the denominator); wait for every agent that accepts the candidate to run it.
            accepting = options.agents - len(failing)
            await wait_until(lambda: applied_count(fleet, candidate["config_hash"]) >= accepting, 900)
            result["every_accepting_agent_on_candidate_seconds"] = round(time.monotonic() - t0, 1)
            result["agents_on_candidate"] = applied_count(fleet, candidate["config_hash"])
        result["reconnects"] = fleet.stats.disconnects
        result["top_errors"] = dict(fleet.stats.errors.most_common(3))
    finally:
        progress.cancel()
        await fleet.stop(timeout=30)
        server.close()
    return result


async def report_progress(fleet: Fleet, every: float = 10.0) -> None:
    """One line on stderr every `every` seconds, to watch a long run."""
    stats = fleet.stats
    while True:
        await asyncio.sleep(every)
        print(
            f"{time.monotonic() - stats.started_at:7.0f} s: {len(stats.first_reply_at)} answered, "
            f"{stats.replies} replies, {stats.disconnects} disconnects",
            file=sys.stderr,
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=18000)
    parser.add_argument("--failing", type=float, default=0.0002, help="share of agents that reject the candidate")
    parser.add_argument("--budget", type=float, default=0.001, help="max_failure_rate of the rollout")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each stage holds (compressed from 1 h)")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument(
        "--apply-timeout",
        type=float,
        default=600.0,
        help="the rollout's apply_timeout_seconds: a target that has not answered by then leaves the denominator, "
        "so it must exceed the time the servers take to process a stage's answers",
    )
    parser.add_argument("--connect-rate", type=float, default=300.0, help="agents started per second")
    parser.add_argument(
        "--server-processes",
        type=int,
        default=1,
        help="daphne processes to spread agents over (with more than one, another serves the API alone)",
    )
    parser.add_argument("--load-cpus", default="", help="pin the load generator to these CPUs, e.g. 1 (Linux)")
    parser.add_argument(
        "--ping-timeout",
        type=int,
        default=30,
        help="daphne drops a client that has not answered its ping within this many seconds; "
        "a load generator starved of CPU for longer loses every connection at once",
    )
    parser.add_argument(
        "--ping-interval", type=int, default=60, help="seconds between daphne's WebSocket pings (its default: 20)"
    )
    parser.add_argument("--backoff", type=float, default=0.5, help="agents' first reconnect delay, seconds")
    parser.add_argument("--seed", type=int, default=1)
    print(json.dumps(asyncio.run(drill(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
