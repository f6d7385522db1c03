"""The per-process resolver cache: served while nothing changed, never stale after a write.

"Another process" is simulated by putting back the entry that was cached before the
write: a write clears the cache of the process that makes it, but every other process
still holds the old entry and must notice the new token on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet import agent_labels
from fleet import services as fleet_services
from fleet.models import Agent
from fleet.reports import ReportLimits, report_from_message
from opamp.identifiers import uuid7
from rollouts import resolver_cache, services
from rollouts.desired_state import current_generation, desired_config_for_agent, resolve_agent, resolve_new_agent
from rollouts.models import AgentDesiredConfig, Configuration, ConfigVersion, RolloutTarget
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import rollout_abort, rollout_promote, rollout_start
from tests.fleet.messages import BASE_CAPABILITIES, full_report
from tests.rollouts.rollout_helpers import CANDIDATE, STABLE, answer_all, configuration_with_candidate, standard_rollout

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def empty_cache() -> Any:
    resolver_cache.clear()
    yield
    resolver_cache.clear()


def files(body: str) -> dict:
    return {"c.yaml": {"body": body, "content_type": "text/yaml"}}


def version_of_new_agent(**labels: str) -> int | None:
    """Create an agent and resolve it the way a first report does; its version id."""
    agent = Agent.objects.create(instance_uid=uuid7(), labels=labels, last_seen=timezone.now(), connected=True)
    return resolve_new_agent(agent_id=agent.pk, instance_uid=agent.instance_uid, labels=agent.labels)


def as_another_process(write: Callable[[], object]) -> None:
    """Run `write` while keeping the cache entry that was there before it."""
    resolver_cache.resolver_definitions()
    stale = resolver_cache._definitions
    assert stale is not None
    write()
    resolver_cache._definitions = stale


def current_version_id(name: str) -> int:
    version_id = Configuration.objects.get(name=name).current_version_id
    assert version_id is not None
    return version_id


def test_nothing_but_the_token_is_read_while_no_definition_changed():
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    version_of_new_agent(env="prod")
    expected = current_version_id("prod")
    with CaptureQueriesContext(connection) as queries:
        assert version_of_new_agent(env="prod") == expected
    read_tables = " ".join(q["sql"] for q in queries.captured_queries if q["sql"].lstrip().startswith("SELECT"))
    assert "rollouts_configuration" not in read_tables
    assert "rollouts_rollout" not in read_tables
    assert "rollouts_desiredstategeneration" in read_tables


def test_publishing_a_version_reaches_the_next_resolve_in_another_process():
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    first, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    assert version_of_new_agent(env="prod") == first.pk
    as_another_process(
        lambda: services.configuration_publish(configuration=configuration, files=files("a: 2\n"), author=None)
    )
    second = current_version_id("prod")
    assert second != first.pk
    assert version_of_new_agent(env="prod") == second


def test_rollback_selector_priority_create_and_delete_each_reach_other_processes():
    low = services.configuration_create(name="low", selector="env=prod", priority=1, actor=None)
    low_v1, _ = services.configuration_publish(configuration=low, files=files("low: 1\n"), author=None)
    services.configuration_publish(configuration=low, files=files("low: 2\n"), author=None)

    as_another_process(lambda: services.configuration_rollback(configuration=low, to_number=1, author=None))
    restored = current_version_id("low")
    assert ConfigVersion.objects.get(pk=restored).config_hash == low_v1.config_hash
    assert version_of_new_agent(env="prod") == restored

    def create_higher() -> None:
        high = services.configuration_create(name="high", selector="env=prod", priority=5, actor=None)
        services.configuration_publish(configuration=high, files=files("high: 1\n"), author=None)

    as_another_process(create_higher)
    high = Configuration.objects.get(name="high")
    assert version_of_new_agent(env="prod") == high.current_version_id

    as_another_process(lambda: services.configuration_update(configuration=high, priority=0, actor=None))
    assert version_of_new_agent(env="prod") == restored

    as_another_process(lambda: services.configuration_update(configuration=low, selector="env=staging", actor=None))
    assert version_of_new_agent(env="prod") == high.current_version_id
    assert version_of_new_agent(env="staging") == restored

    as_another_process(lambda: services.configuration_delete(configuration=high, actor=None))
    assert version_of_new_agent(env="prod") is None


def test_rollout_transitions_each_reach_other_processes():
    configuration, stable, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    canary = {"env": "prod", "deployment.canary": "true"}
    assert version_of_new_agent(**canary) == stable.pk

    as_another_process(lambda: rollout_start(rollout=rollout, actor=None))
    assert version_of_new_agent(**canary) == candidate.pk
    # The canary resolved before the start (moved by the start itself) and the new one.
    assert RolloutTarget.objects.filter(rollout=rollout, stage_index=0).count() == 2

    # Agents outside stage 0 stay on stable until a later stage takes them; promote
    # jumps to the last stage, which takes everyone.
    assert version_of_new_agent(env="prod", idx="x") in {stable.pk, candidate.pk}
    as_another_process(lambda: rollout_promote(rollout=rollout, actor=None))
    assert {version_of_new_agent(env="prod", idx=str(i)) for i in range(20)} == {candidate.pk}

    as_another_process(lambda: rollout_abort(rollout=rollout, actor=None))
    assert {version_of_new_agent(env="prod", idx=str(i)) for i in range(5)} == {stable.pk}
    assert version_of_new_agent(**canary) == stable.pk


def test_a_succeeded_rollout_makes_the_candidate_current_for_other_processes():
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    rollout_promote(rollout=rollout, actor=None)
    assert version_of_new_agent(env="prod") == candidate.pk  # the rollout's plan
    answer_all()

    as_another_process(lambda: rollout_tick(rollout_id=rollout.pk))
    rollout.refresh_from_db()
    assert rollout.state == "succeeded"
    assert version_of_new_agent(env="prod") == candidate.pk  # now the current version
    assert current_version_id("fleet") == candidate.pk


def test_a_rolled_back_write_is_never_served_even_after_later_writes():
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    stable, _ = services.configuration_publish(configuration=configuration, files=files("a: 1\n"), author=None)
    assert version_of_new_agent(env="prod") == stable.pk

    inside: list[Any] = []
    with pytest.raises(RuntimeError), transaction.atomic():
        other = services.configuration_create(name="other", selector="env=prod", priority=9, actor=None)
        services.configuration_publish(configuration=other, files=files("b: 1\n"), author=None)
        assert version_of_new_agent(env="prod") != stable.pk  # cached inside the transaction
        inside.append(resolver_cache._definitions)
        raise RuntimeError("abandon the write")

    # Another process cached the abandoned state; a later, unrelated write must not make
    # that entry look current again (a counter would hand out the same value).
    assert inside[0] is not None
    services.configuration_create(name="unrelated", selector="env=none", actor=None)
    resolver_cache._definitions = inside[0]
    assert version_of_new_agent(env="prod") == stable.pk


def test_a_new_agents_first_report_is_assigned_without_a_hint_or_a_generation_bump(
    django_capture_on_commit_callbacks: Any,
):
    configuration = services.configuration_create(name="prod", selector="service.name=checkout", actor=None)
    version, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    generation = current_generation()
    uid = uuid7()
    message = full_report(uid.bytes, 0, service="checkout")
    report = report_from_message(message, ReportLimits(), BASE_CAPABILITIES)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        snapshot = fleet_services.agent_record_report(
            instance_uid=uid,
            report=report,
            sequence_num=0,
            transport="websocket",
            remote_address="127.0.0.1",
            seen_at=timezone.now(),
        )
    assert callbacks == []
    assert current_generation() == generation
    desired = desired_config_for_agent(snapshot.agent_id)
    assert desired is not None
    assert (desired.version_id, desired.files) == (version.pk, version.files)


def test_a_relabelled_agent_is_still_resolved_and_hinted(django_capture_on_commit_callbacks: Any):
    configuration = services.configuration_create(name="prod", selector="env=prod", actor=None)
    version, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    agent = Agent.objects.create(instance_uid=uuid7(), labels={"env": "dev"}, last_seen=timezone.now())
    assert resolve_agent(agent.pk) == []
    generation = current_generation()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        agent_labels.agent_labels_set(instance_uid=agent.instance_uid, labels={"env": "prod"}, actor=None)
    assert len(callbacks) == 1
    assert current_generation() > generation
    assert AgentDesiredConfig.objects.get(agent=agent).version_id == version.pk


def test_delivered_files_follow_the_desired_version():
    configuration, _, candidate = configuration_with_candidate()
    agent = Agent.objects.create(instance_uid=uuid7(), labels={"env": "prod"}, last_seen=timezone.now())
    resolve_agent(agent.pk)
    desired = desired_config_for_agent(agent.pk)
    assert desired is not None and desired.files == STABLE
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    rollout_promote(rollout=rollout, actor=None)
    desired = desired_config_for_agent(agent.pk)
    assert desired is not None
    assert (desired.config_hash, desired.files) == (candidate.config_hash, CANDIDATE)
