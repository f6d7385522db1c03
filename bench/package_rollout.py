"""A package rollout to N simulated agents: every agent downloads the file for real (streamed
and hashed, signature checked against the server's key, nothing kept on disk), 1% -> 10% ->
100% with compressed holds, advanced by a real Celery worker with beat.

    python bench/package_rollout.py --agents 2000 --size-mb 1 --hold 5

Starts its own server process (daphne) with a signing key and a Celery worker+beat on a fresh
database: the production profile when OPAMP_TEST_PROFILE=production with DATABASE_URL /
REDIS_URL set (PostgreSQL, Redis), the embedded default otherwise. Version 1.0.0 is assigned
to every agent first (all of them download it at once), then 2.0.0 is rolled out. Reports
how long each stage lasted, the end-to-end time until every agent reported 2.0.0 installed,
and the server's download throughput (bytes the agents received over the wall-clock time,
and the best one-second window). Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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
from agent_client.packages import PackageSettings  # noqa: E402
from agent_client.simulator import Fleet, progress_line, with_packages  # noqa: E402
from opamp.config_signature import key_id_for  # noqa: E402
from signing.config_signing import generate_signing_key  # noqa: E402
from tests.support.live_server import LiveOpampServer  # noqa: E402

PACKAGE = "collector"


def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def on_version(fleet: Fleet, version: str) -> int:
    return sum(
        (installed := agent.packages.installed.get(PACKAGE)) is not None and installed.version == version
        for agent in fleet.agents
    )


def failed(fleet: Fleet) -> int:
    return sum(PACKAGE in agent.packages.failed for agent in fleet.agents)


def downloaded(fleet: Fleet) -> int:
    return sum(agent.package_bytes_downloaded for agent in fleet.agents)


class Throughput:
    """Samples the bytes the fleet received once a second: the best one-second window."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.best = 0.0

    async def run(self) -> None:
        last, at = downloaded(self.fleet), time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now_bytes, now = downloaded(self.fleet), time.monotonic()
            self.best = max(self.best, (now_bytes - last) / (now - at))
            last, at = now_bytes, now


async def wait_until(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return False


async def bench(options: argparse.Namespace) -> dict[str, Any]:
    raise_open_file_limit(options.agents)
    workdir = Path(tempfile.mkdtemp(prefix="opamp-package-rollout-"))
    pair = generate_signing_key(workdir / "signing-key.pem")
    server = LiveOpampServer(
        workdir / "server",
        extra_env={
            "OPAMP_SIGNING_KEY_FILE": str(workdir / "signing-key.pem"),
            "OPAMP_ROLLOUT_TICK_SECONDS": "1",
            "OPAMP_HEARTBEAT_FLUSH_SECONDS": "2",
            "OPAMP_HEARTBEAT_INTERVAL_SECONDS": str(options.heartbeat),
        },
        daphne_args=["--ping-interval", "60", "--ping-timeout", "30", "--websocket_connect_timeout", "30"],
    )
    server.start()
    server.start_celery()
    service = f"pkgbench-{secrets.token_hex(3)}"
    trusted = {key_id_for(pair.public_key): pair.public_key}

    def base(index: int) -> AgentSettings:
        return AgentSettings(
            identifying_attributes={"service.name": service},
            heartbeat_interval=options.heartbeat,
            trusted_keys=trusted,
            backoff_initial=options.backoff,
            backoff_max=max(options.backoff, 60.0),
        )

    settings_for = with_packages(base, count=options.agents, packages=PackageSettings(directory=None))
    fleet = Fleet(
        server=server.ws_url, count=options.agents, settings_for=settings_for, connect_rate=options.connect_rate
    )
    gc.collect()
    gc.freeze()
    size = int(options.size_mb * 1024 * 1024)
    result: dict[str, Any] = {
        "agents": options.agents,
        "file_bytes": size,
        "hold_seconds": options.hold,
        "heartbeat_seconds": options.heartbeat,
    }
    progress = asyncio.create_task(report_progress(fleet))
    meter = Throughput(fleet)
    metering = asyncio.create_task(meter.run())
    try:
        started = time.monotonic()
        await fleet.start()
        if not await fleet.wait_connected(options.agents / max(options.connect_rate, 1) + 300):
            raise SystemExit(f"only {len(fleet.stats.first_reply_at)} agents connected")
        result["connect_seconds"] = round(time.monotonic() - started, 1)

        # -- 1.0.0 to every agent at once ------------------------------------------------
        server.api_post("packages/", {"name": PACKAGE, "type": "top_level"})
        server.upload_package(PACKAGE, "1.0.0", b"1" * size, timeout=120)
        t0, bytes0 = time.monotonic(), downloaded(fleet)
        server.api_post(
            "package-assignments/",
            {"name": PACKAGE, "package": PACKAGE, "version": "1.0.0", "selector": f"service.name={service}"},
        )
        # An agent whose install failed (a download cut by an overloaded server) stays
        # failed: the server holds a failed version until the assignment changes.
        await wait_until(lambda: on_version(fleet, "1.0.0") + failed(fleet) >= options.agents, 900)
        seconds = time.monotonic() - t0
        result["assign_installed"] = on_version(fleet, "1.0.0")
        result["assign_failed"] = failed(fleet)
        result["assign_all_installed_seconds"] = round(seconds, 1)
        result["assign_download_mb_per_s"] = round((downloaded(fleet) - bytes0) / seconds / 1e6, 1)
        result["assign_best_second_mb_per_s"] = round(meter.best / 1e6, 1)

        # -- the rollout of 2.0.0 --------------------------------------------------------
        server.upload_package(PACKAGE, "2.0.0", b"2" * size, timeout=120)
        meter.best = 0.0
        stages = [
            {"percent": 1, "hold_seconds": options.hold},
            {"percent": 10, "hold_seconds": options.hold},
            {"percent": 100},
        ]
        rollout = server.api_post(
            "rollouts/",
            {
                "package": PACKAGE,
                "candidate_version": "2.0.0",
                "stages": stages,
                "max_failure_rate": 0.01,
                "apply_timeout_seconds": options.apply_timeout,
            },
        )
        t0, bytes0 = time.monotonic(), downloaded(fleet)
        server.api_post(f"rollouts/{rollout['id']}/start/", {})

        def finished() -> bool:
            try:
                return server.api(f"rollouts/{rollout['id']}/")["state"] in {"succeeded", "rolled_back", "paused"}
            except httpx.HTTPError as error:
                print(f"poll failed: {error}", file=sys.stderr, flush=True)
                return False

        await wait_until(finished, 1800, interval=1.0)
        result["rollout_end_to_end_seconds"] = round(time.monotonic() - t0, 1)
        await wait_until(lambda: on_version(fleet, "2.0.0") + failed(fleet) >= options.agents, 900)
        seconds = time.monotonic() - t0
        result["rollout_all_answered_seconds"] = round(seconds, 1)
        result["agents_on_2_0_0"] = on_version(fleet, "2.0.0")
        result["agents_failed"] = failed(fleet)
        result["rollout_download_mb_per_s"] = round((downloaded(fleet) - bytes0) / seconds / 1e6, 1)
        result["rollout_best_second_mb_per_s"] = round(meter.best / 1e6, 1)
        detail = server.api(f"rollouts/{rollout['id']}/")
        events = server.api(f"rollouts/{rollout['id']}/events/")
        result["final_state"] = detail["state"]
        times = [(e["kind"], e["stage_index"], stamp(e["at"])) for e in events]
        begin = next(t for kind, _, t in times if kind == "started")
        marks = [(0, begin)] + [(stage, t) for kind, stage, t in times if kind == "stage_started"]
        end = next((t for kind, _, t in times if kind in {"succeeded", "budget_exceeded", "paused"}), times[-1][2])
        result["stage_seconds"] = {
            f"stage {stage} ({stages[stage].get('percent')}%)": round(
                (marks[i + 1][1] if i + 1 < len(marks) else end) - t, 1
            )
            for i, (stage, t) in enumerate(marks)
        }
        result["stage_agents"] = {f"stage {s['index']}": (s["counts"] or {}).get("targeted") for s in detail["stages"]}
        result["status_summary"] = server.api(f"packages/{PACKAGE}/status/")["versions"]
        result["reconnects"] = fleet.stats.disconnects
        result["top_errors"] = dict(fleet.stats.errors.most_common(3))
    finally:
        progress.cancel()
        metering.cancel()
        await fleet.stop(timeout=30)
        server.close()
    return result


async def report_progress(fleet: Fleet, every: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every)
        print(progress_line(fleet), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--size-mb", type=float, default=1.0, help="size of each version's file, MiB")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each stage holds (compressed from 1 h)")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--apply-timeout", type=float, default=600.0, help="the rollout's apply_timeout_seconds")
    parser.add_argument("--connect-rate", type=float, default=300.0, help="agents started per second")
    parser.add_argument("--backoff", type=float, default=0.5, help="agents' first reconnect delay, seconds")
    print(json.dumps(asyncio.run(bench(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
