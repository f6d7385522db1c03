"""The gate and agents that are away: an agent whose socket closed moments ago (the row
marked disconnected at once) is still reachable and holds its stage until it answers or
the offline grace passes; a stage with more than the set share of its targets offline holds
instead of succeeding ("No data -> hold, never promote")."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from fleet.models import Agent
from fleet.services import agent_mark_disconnected
from rollouts.models import Rollout, RolloutState, RolloutTarget
from rollouts.rollout_services.answers import offline_grace, stage_counts
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import rollout_start
from tests.rollouts.rollout_helpers import answer_all, configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db


def tick(rollout: Rollout, **kwargs: object) -> str:
    result = rollout_tick(rollout_id=rollout.pk, **kwargs)
    rollout.refresh_from_db()
    return result


def disconnect(agent_ids: list[int]) -> None:
    """What a closed socket does to each row: connected off, disconnected_at and last_seen now."""
    for agent in Agent.objects.filter(pk__in=agent_ids):
        assert agent_mark_disconnected(instance_uid=agent.instance_uid, at=timezone.now(), sequence_num=None)


def started_last_stage() -> Rollout:
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    for expected in ("stage 1 started", "stage 2 started"):
        answer_all()
        assert tick(rollout) == expected
    return rollout


def last_stage_agents(rollout: Rollout) -> list[int]:
    return list(RolloutTarget.objects.filter(rollout=rollout, stage_index=2).values_list("agent_id", flat=True))


def test_most_agents_away_at_a_stage_boundary_hold_the_stage_until_they_answer():
    rollout = started_last_stage()
    stage = last_stage_agents(rollout)
    away = stage[: len(stage) * 9 // 10]
    disconnect(away)
    answer_all(skip=set(away))
    counts = stage_counts(rollout)[2]
    assert (counts.pending, counts.offline) == (len(away), 0)
    assert tick(rollout) == "holding: waiting for answers"
    assert rollout.state == RolloutState.RUNNING
    # Back within their retry time: they answer and the stage completes.
    Agent.objects.filter(pk__in=away).update(connected=True, last_seen=timezone.now())
    answer_all()
    assert tick(rollout) == "succeeded"


def test_a_stage_whose_agents_all_just_disconnected_does_not_succeed():
    rollout = started_last_stage()
    stage = last_stage_agents(rollout)
    disconnect(stage)
    assert tick(rollout) == "holding: waiting for answers"
    assert rollout.state == RolloutState.RUNNING


def test_past_the_grace_a_mostly_offline_stage_holds_and_a_few_offline_leave_the_denominator():
    rollout = started_last_stage()
    stage = last_stage_agents(rollout)
    away = stage[: len(stage) * 9 // 10]
    disconnect(away)
    answer_all(skip=set(away))
    later = timezone.now() + offline_grace() + timedelta(seconds=1)
    counts = stage_counts(rollout, now=later)[2]
    assert (counts.pending, counts.offline) == (0, len(away))
    assert tick(rollout, now=later) == "holding: too many agents offline"
    assert tick(rollout, now=later + timedelta(hours=1)) == "holding: too many agents offline"
    assert rollout.state == RolloutState.RUNNING
    # Most come back and answer; the few still away leave the denominator (rollouts.md).
    back, still_away = away[: len(away) - 5], away[len(away) - 5 :]
    Agent.objects.filter(pk__in=back).update(connected=True, last_seen=later)
    answer_all(skip=set(still_away))
    counts = stage_counts(rollout, now=later)[2]
    assert (counts.pending, counts.offline) == (0, 5)
    assert tick(rollout, now=later) == "succeeded"


def test_past_the_grace_an_all_offline_last_stage_holds():
    rollout = started_last_stage()
    disconnect(last_stage_agents(rollout))
    later = timezone.now() + offline_grace() + timedelta(seconds=1)
    assert tick(rollout, now=later) == "holding: too many agents offline"
    assert rollout.state == RolloutState.RUNNING
