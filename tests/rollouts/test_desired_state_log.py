"""The log of changed assignments: a server process re-reads only the agents that changed.

A server process is simulated by a DesiredConfigCache filled the way sessions fill it;
writes happen through the real services and rollout engine.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from fleet import agent_labels
from fleet.models import Agent
from rollouts import services
from rollouts.desired_cache import CachedDesired, DesiredConfigCache
from rollouts.desired_state import (
    DesiredStateChanges,
    changes_since,
    current_generation,
    desired_config_for_agent,
    prune_changes,
)
from rollouts.models import DesiredStateChange, RolloutTarget
from rollouts.rollout_services.verbs import rollout_start
from rollouts.tasks import prune_desired_state_log
from tests.rollouts.rollout_helpers import configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db


def warm_cache(agents: list[Agent]) -> DesiredConfigCache:
    """A process that has caught up and holds every agent's desired config."""
    cache = DesiredConfigCache()
    cache.start_check()
    cache.catch_up(changes_since(cache.generation))
    for agent in agents:
        cache.put(agent.instance_uid, CachedDesired(cache.generation, agent.pk, desired_config_for_agent(agent.pk)))
    return cache


def catch_up(cache: DesiredConfigCache) -> None:
    cache.start_check()
    cache.catch_up(changes_since(cache.generation))


def still_cached(cache: DesiredConfigCache, agents: list[Agent]) -> set[int]:
    return {agent.pk for agent in agents if cache.get(agent.instance_uid) is not None}


def test_a_canary_stage_makes_a_process_forget_only_the_canaries():
    agents = make_fleet(197) + make_fleet(3, **{"deployment.canary": "true"})  # always in the first stage
    configuration, _, candidate = configuration_with_candidate()
    cache = warm_cache(agents)
    rollout = standard_rollout(configuration, candidate)

    assert rollout_start(rollout=rollout, actor=None)
    catch_up(cache)

    canaries = set(RolloutTarget.objects.filter(rollout=rollout).values_list("agent_id", flat=True))
    assert 3 <= len(canaries) < 15
    assert still_cached(cache, agents) == {agent.pk for agent in agents} - canaries
    for agent in agents:
        if agent.pk in canaries:
            fresh = desired_config_for_agent(agent.pk)
            assert fresh is not None and fresh.version_id == candidate.pk


def test_configuration_writes_that_change_no_assignment_leave_every_entry_cached():
    agents = make_fleet(20)
    configuration, _, _ = configuration_with_candidate()
    cache = warm_cache(agents)
    generation = current_generation()

    services.configuration_update(configuration=configuration, actor=None, description="renamed nothing")
    services.configuration_create(name="unrelated", selector="env=none", actor=None)
    catch_up(cache)

    assert current_generation() == generation
    assert still_cached(cache, agents) == {agent.pk for agent in agents}


def test_an_agent_losing_its_assignment_is_forgotten():
    agents = make_fleet(3)
    configuration_with_candidate()
    cache = warm_cache(agents)

    agent_labels.agent_labels_set(instance_uid=agents[0].instance_uid, labels={"env": "staging"}, actor=None)
    catch_up(cache)

    assert still_cached(cache, agents) == {agents[1].pk, agents[2].pk}
    assert desired_config_for_agent(agents[0].pk) is None


def test_a_read_that_started_before_a_change_is_not_trusted_after_it():
    """A session's read can finish after the process caught up with a change it missed."""
    agents = make_fleet(2)
    configuration_with_candidate()
    cache = warm_cache([])
    tag = cache.generation
    stale_read = desired_config_for_agent(agents[0].pk)  # the read, then the change commits

    agent_labels.agent_labels_set(instance_uid=agents[0].instance_uid, labels={"env": "staging"}, actor=None)
    catch_up(cache)
    cache.put(agents[0].instance_uid, CachedDesired(tag, agents[0].pk, stale_read))
    cache.put(agents[1].instance_uid, CachedDesired(tag, agents[1].pk, desired_config_for_agent(agents[1].pk)))

    assert cache.get(agents[0].instance_uid) is None
    assert cache.get(agents[1].instance_uid) is not None


def test_a_process_behind_the_pruned_log_forgets_everything_once():
    agents = make_fleet(3)
    configuration_with_candidate()
    cache = warm_cache(agents)
    agent_labels.agent_labels_set(instance_uid=agents[0].instance_uid, labels={"env": "staging"}, actor=None)
    logged = DesiredStateChange.objects.count()

    assert prune_changes(older_than=timezone.now() + timedelta(seconds=1)) == logged
    catch_up(cache)

    assert still_cached(cache, agents) == set()
    assert not DesiredStateChange.objects.exists()
    warm = warm_cache(agents)  # a process that caught up after the prune follows the log again
    agent_labels.agent_labels_set(instance_uid=agents[1].instance_uid, labels={"env": "staging"}, actor=None)
    catch_up(warm)
    assert still_cached(warm, agents) == {agents[0].pk, agents[2].pk}


def test_the_prune_task_keeps_the_retention_window():
    agents = make_fleet(2)
    configuration_with_candidate()
    agent_labels.agent_labels_set(instance_uid=agents[0].instance_uid, labels={"env": "staging"}, actor=None)
    logged = DesiredStateChange.objects.count()

    assert prune_desired_state_log() == 0
    assert DesiredStateChange.objects.count() == logged

    DesiredStateChange.objects.update(created_at=timezone.now() - timedelta(days=1))
    assert prune_desired_state_log() == logged
    assert changes_since(0).agent_ids is None


def test_every_change_of_a_transaction_is_one_log_row_under_one_generation():
    make_fleet(50)
    generation = current_generation()
    configuration_with_candidate()  # creating the configuration assigns all 50

    rows = list(DesiredStateChange.objects.filter(generation__gt=generation))
    assert [len(row.agent_ids) for row in rows] == [50]
    assert changes_since(generation) == DesiredStateChanges(rows[0].generation, frozenset(rows[0].agent_ids))
    assert changes_since(rows[0].generation).agent_ids == frozenset()
