"""A new agent's first report racing a change of the definitions (a publish) on PostgreSQL.

The two transactions are interleaved by hand, with threads and events, so each ordering
is reproduced every time: the agent resolves under the definitions of before the publish,
while the publish's own resolution cannot see the agent's uncommitted row.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections
from django.utils import timezone

from fleet import services as fleet_services
from fleet.reports import ReportLimits, report_from_message
from opamp.identifiers import uuid7
from rollouts import desired_state, resolver_cache, services
from rollouts.models import AgentDesiredConfig
from tests.fleet.messages import BASE_CAPABILITIES, full_report
from tests.rollouts.rollout_helpers import STABLE

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 20.0


@pytest.fixture(autouse=True)
def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs concurrent transactions: PostgreSQL (SQLite serialises every writer)")
    resolver_cache.clear()


def first_report(uid: uuid.UUID) -> int:
    report = report_from_message(full_report(uid.bytes, 0, service="checkout"), ReportLimits(), BASE_CAPABILITIES)
    snapshot = fleet_services.agent_record_report(
        instance_uid=uid,
        report=report,
        sequence_num=0,
        transport="websocket",
        remote_address="127.0.0.1",
        seen_at=timezone.now(),
    )
    return snapshot.agent_id


def in_thread(target: Callable[[], Any], results: dict[str, Any], key: str) -> threading.Thread:
    """Run `target` in a thread named `key`, its result (or error) in `results[key]`."""

    def run() -> None:
        try:
            results[key] = target()
        except BaseException as error:  # reported by the test, not lost in the thread
            results[key] = error
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=key, daemon=True)
    thread.start()
    return thread


def assigned_version(uid: uuid.UUID) -> int | None:
    return AgentDesiredConfig.objects.filter(agent__instance_uid=uid).values_list("version_id", flat=True).first()


def test_a_publish_committed_between_a_new_agents_resolution_and_its_commit_reaches_the_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configuration = services.configuration_create(name="prod", selector="service.name=checkout", actor=None)
    resolved, go_on = threading.Event(), threading.Event()
    real_definitions = desired_state.resolver_definitions

    def definitions_then_pause() -> Any:
        definitions = real_definitions()
        if threading.current_thread().name == "agent":
            resolved.set()
            assert go_on.wait(WAIT)
        return definitions

    monkeypatch.setattr(desired_state, "resolver_definitions", definitions_then_pause)
    uid = uuid7()
    results: dict[str, Any] = {}
    agent = in_thread(lambda: first_report(uid), results, "agent")
    assert resolved.wait(WAIT)
    version, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    go_on.set()
    agent.join(WAIT)
    assert not agent.is_alive()
    assert isinstance(results["agent"], int), results["agent"]
    assert assigned_version(uid) == version.pk


def test_a_new_agent_resolved_while_a_publish_is_in_flight_gets_the_published_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configuration = services.configuration_create(name="prod", selector="service.name=checkout", actor=None)
    publish_resolved, go_on = threading.Event(), threading.Event()
    real_resolve = desired_state.resolve_for_configuration

    def resolve_then_pause(*args: Any, **kwargs: Any) -> list[int]:
        changed = real_resolve(*args, **kwargs)
        if threading.current_thread().name == "publish":
            publish_resolved.set()
            assert go_on.wait(WAIT)
        return changed

    monkeypatch.setattr(desired_state, "resolve_for_configuration", resolve_then_pause)
    results: dict[str, Any] = {}

    def publish() -> Any:
        return services.configuration_publish(configuration=configuration, files=STABLE, author=None)

    publisher = in_thread(publish, results, "publish")
    # The publish has resolved every agent it can see and holds its transaction open.
    assert publish_resolved.wait(WAIT)
    uid = uuid7()
    agent = in_thread(lambda: first_report(uid), results, "agent")
    deadline = time.monotonic() + WAIT
    while agent.is_alive() and not agent_waits_for_a_lock() and time.monotonic() < deadline:
        time.sleep(0.02)
    go_on.set()
    publisher.join(WAIT)
    agent.join(WAIT)
    assert not publisher.is_alive() and not agent.is_alive()
    assert isinstance(results["agent"], int), results["agent"]
    version, created = results["publish"]
    assert created
    assert assigned_version(uid) == version.pk


def agent_waits_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool(cursor.fetchone()[0])
