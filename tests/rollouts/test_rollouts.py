from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone

from fleet import agent_labels
from fleet.errors import DomainError
from fleet.models import Agent
from opamp.identifiers import uuid7
from rollouts import services
from rollouts.cohorts import BUCKETS, StagePlan, bucket_of, cohort_of, percent_threshold
from rollouts.models import Rollout, RolloutEvent, RolloutState, RolloutTarget
from rollouts.rollout_services.answers import stage_counts
from rollouts.rollout_services.creation import StageSpec, rollout_create, rollout_dry_run
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import (
    rollout_abort,
    rollout_approve_stage,
    rollout_pause,
    rollout_promote,
    rollout_resume,
    rollout_retry,
    rollout_start,
)
from tests.rollouts.rollout_helpers import (
    answer_all,
    configuration_with_candidate,
    go_offline,
    hashes_by_agent,
    make_fleet,
    standard_rollout,
)

pytestmark = pytest.mark.django_db
Kind = RolloutEvent.Kind


def tick(rollout: Rollout) -> str:
    result = rollout_tick(rollout_id=rollout.pk)
    rollout.refresh_from_db()
    return result


def test_buckets_are_deterministic_and_spread_over_ten_thousand():
    uids = [uuid7().bytes for _ in range(2000)]
    assert [bucket_of("salt", u) for u in uids] == [bucket_of("salt", u) for u in uids]
    assert all(0 <= bucket_of("salt", u) < BUCKETS for u in uids)
    first_stage = sum(bucket_of("salt", u) < percent_threshold(10) for u in uids)
    assert 140 <= first_stage <= 260  # ~10% of 2,000


def test_cohorts_are_nested_canaries_come_first_and_the_last_stage_catches_all():
    stages = [StagePlan(percent_threshold(1)), StagePlan(percent_threshold(10)), StagePlan(BUCKETS)]
    assert cohort_of(bucket=50, labels={}, stages=stages) == 0
    assert cohort_of(bucket=500, labels={}, stages=stages) == 1
    assert cohort_of(bucket=9999, labels={}, stages=stages) == 2
    assert cohort_of(bucket=9999, labels={"deployment.canary": "true"}, stages=stages) == 0


def test_starting_gives_the_candidate_to_the_first_cohort_only():
    make_fleet(1000)
    configuration, stable, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    assert rollout_start(rollout=rollout, actor=None)
    hashes = Counter(hashes_by_agent().values())
    targets = RolloutTarget.objects.filter(rollout=rollout)
    assert hashes[candidate.config_hash] == targets.count() == targets.filter(stage_index=0).count()
    assert hashes[stable.config_hash] == 1000 - targets.count()
    assert 0 < targets.count() < 30


def test_the_dry_run_shows_each_stage_without_changing_anything():
    make_fleet(1000)
    configuration, _, _ = configuration_with_candidate()
    stages = rollout_dry_run(
        configuration=configuration, stages=[StageSpec(percent=1), StageSpec(percent=10), StageSpec(percent=100)]
    ).stages
    assert [s.cumulative for s in stages][-1] == 1000
    assert stages[0].cohort_size < stages[1].cumulative < 1000
    assert not RolloutTarget.objects.exists()


def test_a_stage_without_data_holds_and_never_promotes():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    assert tick(rollout) == "holding: no data"
    assert rollout.stage_index == 0


def test_stages_advance_within_budget_and_the_candidate_becomes_stable():
    make_fleet(500)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    for expected in ("stage 1 started", "stage 2 started", "succeeded"):
        answer_all()
        assert tick(rollout) == expected
    configuration.refresh_from_db()
    assert rollout.state == RolloutState.SUCCEEDED
    assert configuration.current_version == candidate
    assert set(hashes_by_agent().values()) == {candidate.config_hash}
    kinds = list(rollout.events.values_list("kind", flat=True))
    assert kinds == [Kind.CREATED, Kind.STARTED, Kind.STAGE_STARTED, Kind.STAGE_STARTED, Kind.SUCCEEDED]


def test_the_hold_time_is_respected():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate, hold=3600)
    rollout_start(rollout=rollout, actor=None)
    answer_all()
    assert tick(rollout) == "holding: hold time"
    later = timezone.now() + timedelta(hours=2)
    assert rollout_tick(rollout_id=rollout.pk, now=later) == "stage 1 started"


def test_over_budget_rolls_back_and_every_agent_that_got_the_candidate_returns_to_stable():
    agents = make_fleet(500)
    configuration, stable, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    canaries = set(RolloutTarget.objects.filter(rollout=rollout).values_list("agent_id", flat=True))
    answer_all(failing={min(canaries)})
    assert tick(rollout) == "rolling back"
    assert rollout.state == RolloutState.ROLLING_BACK
    assert set(hashes_by_agent().values()) == {stable.config_hash}
    event = rollout.events.get(kind=Kind.BUDGET_EXCEEDED)
    assert event.counts["failed"] == 1 and "exceeds the budget" in event.message
    assert tick(rollout).startswith("rolling back:")
    answer_all()
    assert tick(rollout) == "rolled back"
    assert rollout.state == RolloutState.ROLLED_BACK
    configuration.refresh_from_db()
    assert configuration.current_version == stable
    assert len(agents) == 500


def test_unhealthy_after_apply_counts_as_a_failure():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    canary = RolloutTarget.objects.filter(rollout=rollout).values_list("agent_id", flat=True).first()
    answer_all(unhealthy={canary})
    assert tick(rollout) == "rolling back"


def test_without_auto_rollback_a_breach_pauses():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate, auto_rollback=False)
    rollout_start(rollout=rollout, actor=None)
    answer_all(failing=set(RolloutTarget.objects.values_list("agent_id", flat=True)))
    assert tick(rollout) == "paused"
    assert rollout.state == RolloutState.PAUSED


def test_offline_agents_are_left_out_of_the_denominator_and_served_when_they_return():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    targets = list(RolloutTarget.objects.filter(rollout=rollout).select_related("agent"))
    go_offline([targets[0].agent])
    answer_all(skip={targets[0].agent_id})
    counts = stage_counts(rollout)[0]
    assert (counts.offline, counts.pending) == (1, 0)
    assert counts.reported == counts.targeted - 1
    assert tick(rollout) == "stage 1 started"


def test_an_agent_joining_mid_rollout_falls_into_its_bucket():
    make_fleet(1000)
    configuration, stable, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    plan_threshold = rollout.stages.get(index=0).bucket_threshold
    newcomer_uid = next(u for u in (uuid7() for _ in range(10_000)) if bucket_of("s", u.bytes) < plan_threshold)
    outsider_uid = next(u for u in (uuid7() for _ in range(10_000)) if bucket_of("s", u.bytes) >= 5000)
    for uid in (newcomer_uid, outsider_uid):
        Agent.objects.create(
            instance_uid=uid, identifying_attributes={"env": "prod"}, last_seen=timezone.now(), connected=True
        )
        agent_labels.agent_labels_set(instance_uid=uid, labels={}, actor=None)  # labels it and resolves it
    hashes = hashes_by_agent()
    assert hashes[Agent.objects.get(instance_uid=newcomer_uid).pk] == candidate.config_hash
    assert hashes[Agent.objects.get(instance_uid=outsider_uid).pk] == stable.config_hash


def test_approval_gates_a_stage():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = rollout_create(
        configuration=configuration,
        candidate=candidate,
        actor=None,
        salt="s",
        stages=[StageSpec(percent=5), StageSpec(percent=100, requires_approval=True)],
    )
    rollout_start(rollout=rollout, actor=None)
    answer_all()
    assert tick(rollout) == "holding: awaiting approval"
    assert tick(rollout) == "holding: awaiting approval"
    assert rollout.events.filter(kind=Kind.AWAITING_APPROVAL).count() == 1
    assert rollout_approve_stage(rollout=rollout, stage_index=1, actor=None)
    assert tick(rollout) == "stage 1 started"


def test_pause_resume_promote_and_abort():
    make_fleet(1000)
    configuration, stable, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    assert rollout_pause(rollout=rollout, actor=None)
    assert tick(rollout) == "idle (paused)"
    assert rollout_resume(rollout=rollout, actor=None)
    assert rollout_promote(rollout=rollout, actor=None)
    rollout.refresh_from_db()
    assert rollout.stage_index == 2
    assert set(hashes_by_agent().values()) == {candidate.config_hash}
    assert rollout_abort(rollout=rollout, actor=None)
    assert set(hashes_by_agent().values()) == {stable.config_hash}


def test_a_verb_in_the_wrong_state_is_a_clear_error():
    make_fleet(10)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    with pytest.raises(DomainError, match="is draft; pause needs it running"):
        rollout_pause(rollout=rollout, actor=None)


def test_retry_starts_a_rolled_back_rollout_again():
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    rollout_abort(rollout=rollout, actor=None)
    answer_all()
    assert tick(rollout) == "rolled back"
    assert rollout_retry(rollout=rollout, actor=None)
    rollout.refresh_from_db()
    assert (rollout.state, rollout.stage_index) == (RolloutState.RUNNING, 0)


def test_only_one_rollout_per_configuration_is_active():
    make_fleet(10)
    configuration, _, candidate = configuration_with_candidate()
    first = standard_rollout(configuration, candidate)
    second = standard_rollout(configuration, candidate)
    rollout_start(rollout=first, actor=None)
    with pytest.raises(DomainError, match="already has an active rollout"):
        rollout_start(rollout=second, actor=None)


def test_publishing_a_current_version_during_a_rollout_is_refused_clearly():
    make_fleet(10)
    configuration, _, candidate = configuration_with_candidate()
    rollout_start(rollout=standard_rollout(configuration, candidate), actor=None)
    with pytest.raises(DomainError, match="has an active rollout"):
        services.configuration_publish(
            configuration=configuration, files={"c.yaml": {"body": "x: 1\n", "content_type": "text/yaml"}}, author=None
        )


def test_a_stale_tick_for_an_aborted_rollout_changes_nothing():
    make_fleet(100)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    rollout_abort(rollout=rollout, actor=None)
    events = rollout.events.count()
    answer_all()
    tick(rollout)  # completes the rollback (everyone runs stable again) ...
    assert rollout.state == RolloutState.ROLLED_BACK
    assert tick(rollout) == "idle (rolled_back)"  # ... and a stale tick afterwards does nothing
    assert rollout.events.count() == events + 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_advances_make_exactly_one_transition():
    if connection.vendor != "postgresql":
        pytest.skip("needs real row locks: PostgreSQL")
    make_fleet(1000)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    answer_all()
    barrier = threading.Barrier(20)
    results: list[str] = []

    def advance() -> None:
        try:
            barrier.wait()
            results.append(rollout_tick(rollout_id=rollout.pk))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=advance) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rollout.refresh_from_db()
    assert rollout.stage_index == 1
    assert results.count("stage 1 started") == 1
    assert rollout.events.filter(kind=Kind.STAGE_STARTED).count() == 1
