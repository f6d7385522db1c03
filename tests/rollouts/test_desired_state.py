from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Agent, RemoteConfigState
from opamp.identifiers import uuid7
from rollouts import services
from rollouts.desired_state import Offer, current_generation, record_offers, resolve_agents
from rollouts.models import AgentDesiredConfig, ConfigVersion, RolloutTarget
from rollouts.rollout_services.verbs import rollout_start
from rollouts.selectors import agent_config_state, drifting_agents, version_status_counts
from tests.fleet.factories import AgentFactory
from tests.rollouts.rollout_helpers import configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db

YAML = "text/yaml"


def files(body: str, name: str = "collector.yaml") -> dict:
    return {name: {"body": body, "content_type": YAML}}


def make_agents(count: int, **labels: str) -> list[Agent]:
    now = timezone.now()
    return Agent.objects.bulk_create(
        [
            Agent(instance_uid=uuid7(), labels={**labels, "idx": str(i)}, last_seen=now, connected=True)
            for i in range(count)
        ]
    )


def desired_version_of(agent: Agent) -> ConfigVersion | None:
    row = AgentDesiredConfig.objects.filter(agent=agent).select_related("version").first()
    return row.version if row else None


def query_budget() -> int:
    """Queries allowed for a change that touches 5,000 agents.

    Reads go in chunks of 2,000 and writes in one upsert per chunk on PostgreSQL (about a
    two dozen statements in all, savepoints included). SQLite caps a statement at 999 parameters, so Django splits
    each upsert into ~150-row statements there: still a fixed fraction, never one per agent.
    """
    return 30 if connection.vendor == "postgresql" else 60


def test_publishing_for_5000_agents_costs_a_bounded_number_of_queries():
    make_agents(5000, env="prod")
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    with CaptureQueriesContext(connection) as queries:
        version, created = services.configuration_publish(
            configuration=configuration, files=files("a: 1\n"), author=None
        )
    assert created
    assert AgentDesiredConfig.objects.filter(version=version).count() == 5000
    assert len(queries) <= query_budget(), [q["sql"][:80] for q in queries.captured_queries]


def test_a_second_publish_for_5000_agents_is_just_as_cheap():
    make_agents(5000, env="prod")
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    with CaptureQueriesContext(connection) as queries:
        version, _ = services.configuration_publish(configuration=configuration, files=files("a: 2\n"), author=None)
    assert AgentDesiredConfig.objects.filter(version=version).count() == 5000
    assert len(queries) <= query_budget()


def test_the_highest_priority_matching_configuration_wins():
    agent = AgentFactory(labels={"env": "prod", "region": "eu"})
    low = services.configuration_create(name="all-prod", selector="env=prod", priority=1, actor=None)
    high = services.configuration_create(name="eu-prod", selector="env=prod,region=eu", priority=10, actor=None)
    services.configuration_publish(configuration=low, files=files("low: 1\n"), author=None)
    high_version, _ = services.configuration_publish(configuration=high, files=files("high: 1\n"), author=None)
    assert desired_version_of(agent) == high_version


def test_equal_priorities_are_decided_by_name():
    agent = AgentFactory(labels={"env": "prod"})
    b = services.configuration_create(name="b", selector="env=prod", actor=None)
    a = services.configuration_create(name="a", selector="env=prod", actor=None)
    services.configuration_publish(configuration=b, files=files("b: 1\n"), author=None)
    a_version, _ = services.configuration_publish(configuration=a, files=files("a: 1\n"), author=None)
    assert desired_version_of(agent) == a_version


def test_changing_the_selector_moves_agents_in_and_out():
    eu = AgentFactory(labels={"region": "eu"})
    us = AgentFactory(labels={"region": "us"})
    configuration = services.configuration_create(name="regional", selector="region=eu", actor=None)
    version, _ = services.configuration_publish(configuration=configuration, files=files("r: 1\n"), author=None)
    assert (desired_version_of(eu), desired_version_of(us)) == (version, None)
    services.configuration_update(configuration=configuration, selector="region=us", actor=None)
    assert (desired_version_of(eu), desired_version_of(us)) == (None, version)


def test_deleting_a_configuration_hands_its_agents_to_the_next_match():
    agent = AgentFactory(labels={"env": "prod"})
    fallback = services.configuration_create(name="fallback", selector="", priority=0, actor=None)
    specific = services.configuration_create(name="specific", selector="env=prod", priority=5, actor=None)
    fallback_version, _ = services.configuration_publish(configuration=fallback, files=files("f: 1\n"), author=None)
    services.configuration_publish(configuration=specific, files=files("s: 1\n"), author=None)
    services.configuration_delete(configuration=specific, actor=None)
    assert desired_version_of(agent) == fallback_version


def test_publishing_identical_content_creates_no_new_version_and_no_generation():
    AgentFactory(labels={"env": "prod"})
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    first, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    generation = current_generation()
    again, created = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    assert (again, created) == (first, False)
    assert current_generation() == generation
    assert configuration.versions.count() == 1


def test_resolving_unchanged_agents_writes_nothing():
    make_agents(50, env="prod")
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    assert resolve_agents(Agent.objects.all()) == []


def test_version_status_counts_follow_what_agents_report():
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    agents = [AgentFactory(labels={"env": "prod"}) for _ in range(6)]
    version, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    applied, applying, failed, _pending, offline, offline_applied = agents
    for agent, state in (
        (applied, RemoteConfigState.APPLIED),
        (applying, RemoteConfigState.APPLYING),
        (failed, RemoteConfigState.FAILED),
        (offline_applied, RemoteConfigState.APPLIED),
    ):
        agent.remote_config_hash, agent.remote_config_state = version.config_hash, state
        agent.save()
    for agent in (offline, offline_applied):
        agent.last_seen = timezone.now() - timedelta(hours=1)
        agent.save()
    counts = version_status_counts(version)
    assert counts == {"total": 6, "applied": 2, "applying": 1, "failed": 1, "pending": 1, "offline": 1}


def test_an_agent_shows_failed_on_version_n_with_its_error():
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    agent = AgentFactory(labels={"env": "prod"})
    version, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    agent.remote_config_hash = version.config_hash
    agent.remote_config_state = RemoteConfigState.FAILED
    agent.remote_config_error = "unknown receiver"
    agent.save()
    state = agent_config_state(agent)
    assert state.state == "failed"
    assert state.summary == "failed on version 1: unknown receiver"


def test_drift_is_flagged_when_the_effective_config_differs_from_the_desired_one(viewer_api):
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    in_sync = AgentFactory(labels={"env": "prod"})
    drifted = AgentFactory(labels={"env": "prod"})
    version, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    Agent.objects.filter(pk=in_sync.pk).update(effective_config_hash=version.config_hash)
    Agent.objects.filter(pk=drifted.pk).update(effective_config_hash="ab" * 32)
    assert list(drifting_agents()) == [drifted]
    drifted.refresh_from_db()
    assert agent_config_state(drifted).drift is True
    listed = viewer_api.get("/api/v1/agents/", {"drift": "true"}).json()["results"]
    assert [a["instance_uid"] for a in listed] == [str(drifted.instance_uid)]


def test_a_rollback_is_a_new_higher_version_with_the_old_content():
    configuration = services.configuration_create(name="prod", selector="", actor=None)
    first, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    services.configuration_publish(configuration=configuration, files=files("a: 2\n"), author=None)
    restored = services.configuration_rollback(configuration=configuration, to_number=1, author=None)
    assert restored.number == 3
    assert restored.config_hash == first.config_hash
    assert restored.rolled_back_from == first


def test_recorded_offers_note_the_first_offer_of_a_rollout_target():
    make_fleet(199)
    make_fleet(1, **{"deployment.canary": "true"})  # always in the first stage
    configuration, stable, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    assert rollout_start(rollout=rollout, actor=None)
    canary = RolloutTarget.objects.filter(rollout=rollout).first()
    assert canary is not None
    bystander = AgentDesiredConfig.objects.exclude(agent_id=canary.agent_id).first()
    assert bystander is not None
    first, later = timezone.now(), timezone.now() + timedelta(seconds=5)

    offers = {
        canary.agent_id: Offer(candidate.config_hash, first, candidate.pk),
        bystander.agent_id: Offer(stable.config_hash, first, stable.pk),
    }
    assert record_offers(offers) == 2
    assert record_offers({canary.agent_id: Offer(candidate.config_hash, later, candidate.pk)}) == 1

    canary.refresh_from_db()
    assert canary.offered_at == first
    assert AgentDesiredConfig.objects.get(agent_id=canary.agent_id).offered_at == later
    assert AgentDesiredConfig.objects.get(agent_id=bystander.agent_id).offered_hash == stable.config_hash


def test_a_new_desired_version_starts_without_an_offer_on_record_and_late_records_of_the_old_one_are_dropped():
    (agent,) = make_agents(1, env="prod")
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    first, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    assert record_offers({agent.pk: Offer(first.config_hash, timezone.now(), first.pk)}) == 1
    services.configuration_publish(configuration=configuration, files=files("a: 2\n"), author=None)
    restored = services.configuration_rollback(configuration=configuration, to_number=first.number, author=None)
    assert restored.config_hash == first.config_hash

    row = AgentDesiredConfig.objects.get(agent=agent)
    assert (row.version_id, row.offered_hash, row.offered_at) == (restored.pk, "", None)
    # A batch written late still names the first version: it is not the rollback's offer.
    assert record_offers({agent.pk: Offer(first.config_hash, timezone.now(), first.pk)}) == 0
    assert AgentDesiredConfig.objects.get(agent=agent).offered_hash == ""
    assert record_offers({agent.pk: Offer(restored.config_hash, timezone.now(), restored.pk)}) == 1
    assert AgentDesiredConfig.objects.get(agent=agent).offered_hash == restored.config_hash
