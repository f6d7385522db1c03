"""CPU per first report of a new agent: the service calls a server thread makes, in-process.

    OPAMP_TEST_PROFILE=production DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        REDIS_URL=redis://127.0.0.1:6379/9 python bench/first_report_cpu.py --agents 500

For each new agent: snapshot lookup (a miss), the report (create, resolve), the desired
config read and the offer record, as `fleet.session` runs them for a first full report,
with three configurations published (one matching) and the production profile's channel
layer (the hints go to Redis). Creates a PostgreSQL database of its own and drops it.
Prints process CPU and wall time per agent; `--profile N` prints the top N functions by
CPU (cProfile, which slows everything down about 2.5x).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
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
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions by CPU")
    options = parser.parse_args()

    with scratch_database("opamp_first_report"):
        measure(options)


def measure(options: argparse.Namespace) -> None:
    set_up_published_fleet()
    from django.utils import timezone

    from fleet import services as fleet_services
    from fleet.reports import ReportLimits, report_from_message
    from rollouts.desired_state import Offer, desired_config_for_agent, record_offers
    from tests.fleet.messages import BASE_CAPABILITIES, full_report

    # Offers are written in batches by the server process (fleet.batched_writes).
    offers: dict[int, Offer] = {}

    def first_report() -> None:
        uid = uuid.uuid4()
        message = full_report(uid.bytes, 0, service="service-0")
        report = report_from_message(message, ReportLimits(), BASE_CAPABILITIES)
        assert fleet_services.agent_snapshot(instance_uid=uid) is None
        snapshot = fleet_services.agent_record_report(
            instance_uid=uid,
            report=report,
            sequence_num=0,
            transport="websocket",
            remote_address="127.0.0.1",
            seen_at=timezone.now(),
        )
        desired = desired_config_for_agent(snapshot.agent_id)
        assert desired is not None
        offers[snapshot.agent_id] = Offer(desired.config_hash, timezone.now(), desired.version_id)
        if len(offers) >= 100:
            record_offers(offers)
            offers.clear()

    for _ in range(50):  # warm-up: connections, caches, imports
        first_report()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(options.agents):
        first_report()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"{options.agents} first reports: {cpu / options.agents * 1000:.2f} ms CPU, "
        f"{wall / options.agents * 1000:.2f} ms wall per agent"
    )
    if options.profile:
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        for _ in range(300):
            first_report()
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(options.profile)


if __name__ == "__main__":
    main()
