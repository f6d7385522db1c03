"""CPU of a known agent's reconnect after a server restart: its first message, in-process.

    OPAMP_TEST_PROFILE=production DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        REDIS_URL=redis://127.0.0.1:6379/9 python bench/reconnect_cpu.py --agents 1000

Inventories `--agents` agents (each a full report through `fleet.session.AgentSession`,
with three configurations published, one matching), forgets everything in memory as a
restarted process would, then times each agent's first message on a new connection (a full
report with description, unchanged) through the same session code, plus the writes its
buffers flush afterwards. No sockets: the handshake and the ASGI server are left out, so
what is left is the application's part of a reconnect (the session, the ORM, psycopg, the
thread pool). Creates a PostgreSQL database of its own and drops it. Prints this process's
CPU (all its threads) and wall time per reconnect as JSON; PostgreSQL's own CPU is not in it.
Needs only `AgentSession`, `reset_runtime` and the buffers' `flush`, so a baseline tree
runs it too (copy it and bench/_inprocess.py into that tree's bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

from _inprocess import scratch_database, set_up_published_fleet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opamp_site.settings.test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    options = parser.parse_args()

    with scratch_database("opamp_reconnect"):
        print(json.dumps(measure(options.agents), indent=2))


def measure(agents: int) -> dict[str, object]:
    set_up_published_fleet()
    from fleet.session import AgentSession
    from fleet.session_runtime import reset_runtime, runtime
    from opamp.proto import opamp_pb2
    from rollouts.session_contributor import RemoteConfigContributor
    from tests.fleet.messages import full_report

    uids = [uuid.uuid4().bytes for _ in range(agents)]

    async def connect_all(sequence_num: int) -> None:
        for uid in uids:
            session = AgentSession(transport="websocket", remote_address="127.0.0.1")
            reply = await session.handle(full_report(uid, sequence_num, service="service-0"))
            assert not reply.HasField("error_response"), reply
            assert not reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState
        fleet = runtime()
        for buffer in (fleet.heartbeats, fleet.statuses, fleet.contributor(RemoteConfigContributor).offers):
            await buffer.flush()

    async def run() -> dict[str, object]:
        await connect_all(1)  # inventoried, and each agent's config offered once
        reset_runtime()  # the process restarts: nothing in memory
        cpu, wall = time.process_time(), time.perf_counter()
        await connect_all(2)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return {
            "agents": agents,
            "cpu_ms_per_reconnect": round(cpu / agents * 1000, 3),
            "wall_ms_per_reconnect": round(wall / agents * 1000, 3),
        }

    return asyncio.run(run())


if __name__ == "__main__":
    main()
