"""The failure-rate series: the stage's counts sampled on rollout ticks, bounded, charted."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from fleet.roles import VIEWER, grant_role
from rollouts import rollout_samples
from rollouts.models import Rollout, RolloutSample, RolloutState, RolloutTarget
from rollouts.rollout_services.answers import StageCounts
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import rollout_start
from rollouts.tasks import advance_rollouts
from tests.fleet.factories import UserFactory
from tests.rollouts.rollout_helpers import answer_all, configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db


def series(rollout: Rollout) -> list[tuple[int, int, int, int]]:
    return list(rollout.samples.order_by("at", "id").values_list("stage", "answered", "failed", "reachable"))


@pytest.fixture
def running() -> Rollout:
    make_fleet(299)
    # Cohorts hash random uids: without a canary the 1% stage is empty in about 5% of runs.
    make_fleet(1, **{"deployment.canary": "true"})
    configuration, _, candidate = configuration_with_candidate()
    # A long hold: the first stage stays current whatever the answers.
    rollout = standard_rollout(configuration, candidate, hold=3600)
    assert rollout_start(rollout=rollout, actor=None)
    return rollout


def test_ticks_sample_the_stage_when_the_counts_change_or_a_while_has_passed(running):
    targeted = RolloutTarget.objects.filter(rollout=running).count()
    assert targeted
    advance_rollouts()  # the beat task
    assert series(running) == [(0, 0, 0, targeted)]
    now = timezone.now()
    rollout_tick(rollout_id=running.pk, now=now + timedelta(seconds=5))
    assert len(series(running)) == 1  # nothing new
    answer_all()
    rollout_tick(rollout_id=running.pk, now=now + timedelta(seconds=10))
    rollout_tick(rollout_id=running.pk, now=now + timedelta(seconds=15))
    assert series(running) == [(0, 0, 0, targeted), (0, targeted, 0, targeted)]
    rollout_tick(rollout_id=running.pk, now=now + timedelta(seconds=10) + rollout_samples.SAMPLE_EVERY)
    assert series(running)[-1] == (0, targeted, 0, targeted) and len(series(running)) == 3


def test_a_failure_is_sampled_on_the_tick_that_rolls_back(running):
    advance_rollouts()
    failing = set(RolloutTarget.objects.filter(rollout=running).values_list("agent_id", flat=True)[:1])
    answer_all(failing=failing)
    advance_rollouts()
    running.refresh_from_db()
    assert running.state == RolloutState.ROLLING_BACK
    last = running.samples.order_by("-at", "-id").first()
    assert (last.failed, last.failure_rate) == (1, 1 / last.reachable)


def test_the_series_is_bounded_per_stage_keeping_its_span_and_old_samples_expire(running, monkeypatch):
    monkeypatch.setattr(rollout_samples, "SAMPLES_PER_STAGE", 10)
    start = timezone.now()
    old = RolloutSample.objects.create(
        rollout=running, stage=1, at=start - rollout_samples.SAMPLE_RETENTION, answered=0, failed=0, reachable=1
    )
    for step in range(50):
        counts = StageCounts(targeted=100, applied=step)
        at = start + timedelta(seconds=step)
        assert rollout_samples.rollout_sample_record(rollout=running, stage=0, counts=counts, now=at)
    kept = list(running.samples.filter(stage=0).order_by("at").values_list("answered", flat=True))
    assert len(kept) <= 10
    assert (kept[0], kept[-1]) == (0, 49)
    assert not RolloutSample.objects.filter(pk=old.pk).exists()


def test_the_live_fragment_draws_every_sample(running):
    advance_rollouts()
    answer_all()
    rollout_tick(rollout_id=running.pk, now=timezone.now() + timedelta(seconds=1))
    samples = running.samples.count()
    assert samples == 2
    decisions = sum(1 for e in running.events.all() if (e.counts or {}).get("failure_rate") is not None)
    user = UserFactory(username="viewer")
    grant_role(user=user, role=VIEWER)
    client = Client()
    client.force_login(user)
    fragment = client.get(f"/rollouts/{running.pk}/", {"fragment": "1"}).content.decode()
    assert f'data-points="{samples + decisions}"' in fragment
    (points,) = re.findall(r'<polyline[^>]* points="([^"]*)"', fragment)
    assert len(points.split()) == samples + decisions
