"""The desired-state reconciler: finds and repairs assignments that differ from the resolver's."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.urls import reverse

from fleet.models import Agent
from rollouts import services
from rollouts.desired_state import computed_assignments, current_generation, stored_assignments
from rollouts.models import AgentDesiredConfig, ReconcilerState
from rollouts.reconciler import BATCH_TOO_SMALL, REPAIR_LOG, ReconcileRun, desired_state_reconcile
from rollouts.rollout_services.verbs import rollout_start
from rollouts.tasks import reconcile_desired_state
from tests.rollouts.rollout_helpers import (
    CANDIDATE,
    STABLE,
    answer_all,
    configuration_with_candidate,
    make_fleet,
    standard_rollout,
)

pytestmark = pytest.mark.django_db


def reconcile(batch_size: int) -> ReconcileRun:
    run = desired_state_reconcile(batch_size=batch_size)
    assert isinstance(run, ReconcileRun)
    return run


def converged() -> bool:
    rows = list(Agent.objects.values_list("pk", "instance_uid", "labels"))
    computed = {agent_id: value for agent_id, value in computed_assignments(rows).items() if value is not None}
    return stored_assignments([row[0] for row in rows]) == computed


def converged_fleet() -> list[Agent]:
    """Agents of two configurations, one of them in the middle of a rollout, and some
    that no configuration selects."""
    agents = make_fleet(40) + make_fleet(10, env="prod", team="web")
    Agent.objects.filter(pk__in=[a.pk for a in agents[:5]]).update(labels={"env": "dev"})
    configuration, _, candidate = configuration_with_candidate()
    web = services.configuration_create(name="web", selector="team=web", priority=5, actor=None)
    services.configuration_publish(configuration=web, files=CANDIDATE, author=None)
    rollout_start(rollout=standard_rollout(configuration, candidate), actor=None)
    answer_all()
    assert converged()
    return agents


def test_a_clean_run_over_a_converged_fleet_repairs_nothing():
    converged_fleet()
    generation = current_generation()
    run = reconcile(1000)
    assert (run.checked, run.repairs, run.wrapped) == (50, (), True)
    assert current_generation() == generation
    state = ReconcilerState.objects.get()
    assert (state.runs, state.last_run_checked, state.last_run_repaired, state.repairs_total) == (1, 50, 0, 0)
    assert state.last_repair_at is None


def test_a_deleted_and_an_altered_assignment_are_repaired_within_one_run(
    caplog: pytest.LogCaptureFixture, django_capture_on_commit_callbacks: Any
):
    agents = converged_fleet()
    web = services.configuration_create(name="other", selector="nobody=here", actor=None)
    other_version, _ = services.configuration_publish(configuration=web, files=STABLE, author=None)
    deleted, altered, mislabelled = agents[10], agents[20], agents[30]
    expected = stored_assignments([deleted.pk, altered.pk, mislabelled.pk])
    AgentDesiredConfig.objects.filter(agent=deleted).delete()
    AgentDesiredConfig.objects.filter(agent=altered).update(configuration=web, version=other_version)
    # The right version under the wrong configuration is a difference too.
    AgentDesiredConfig.objects.filter(agent=mislabelled).update(configuration=web)
    generation = current_generation()
    with (
        caplog.at_level(logging.WARNING, logger="rollouts.reconciler"),
        django_capture_on_commit_callbacks(execute=False) as callbacks,
    ):
        run = reconcile(1000)
    assert sorted(r.agent_id for r in run.repairs) == sorted([deleted.pk, altered.pk, mislabelled.pk])
    assert stored_assignments([deleted.pk, altered.pk, mislabelled.pk]) == expected
    assert converged()
    # Through the resolver's write path: logged under a new generation, and hinted.
    assert current_generation() == generation + 1
    assert len(callbacks) == 1
    messages = [r.getMessage() for r in caplog.records if r.msg == REPAIR_LOG]
    assert len(messages) == 3
    assert any(str(deleted.instance_uid) in m and "was unassigned" in m for m in messages)
    assert any(str(altered.instance_uid) in m and f"version {other_version.pk}, the resolver" in m for m in messages)
    state = ReconcilerState.objects.get()
    assert (state.last_run_repaired, state.repairs_total) == (3, 3)
    assert state.last_repair_at is not None
    # And the next run finds nothing more.
    assert reconcile(1000).repairs == ()
    assert ReconcilerState.objects.get().repairs_total == 3


def test_an_assignment_no_configuration_wants_is_removed():
    agents = converged_fleet()
    stray = agents[0]  # env=dev: no configuration selects it
    assert not AgentDesiredConfig.objects.filter(agent=stray).exists()
    other = AgentDesiredConfig.objects.exclude(agent=stray).first()
    assert other is not None
    AgentDesiredConfig.objects.create(agent=stray, configuration=other.configuration, version=other.version)
    run = reconcile(1000)
    assert [(r.agent_id, r.after) for r in run.repairs] == [(stray.pk, None)]
    assert not AgentDesiredConfig.objects.filter(agent=stray).exists()


def test_paging_continues_across_runs_wraps_around_and_covers_everyone():
    agents = converged_fleet()
    ids = sorted(a.pk for a in agents)
    # One broken agent in each page of 15 (the first five, env=dev, have no assignment).
    broken = [ids[7], ids[17], ids[33], ids[48]]
    assert AgentDesiredConfig.objects.filter(agent_id__in=broken).delete()[0] == 4
    runs = [reconcile(15) for _ in range(4)]
    assert [r.checked for r in runs] == [15, 15, 15, 5]
    assert [r.wrapped for r in runs] == [False, False, False, True]
    assert [r.cursor_agent_id for r in runs] == [ids[14], ids[29], ids[44], 0]
    repaired = [sorted(rep.agent_id for rep in r.repairs) for r in runs]
    assert repaired == [[ids[7]], [ids[17]], [ids[33]], [ids[48]]]
    assert converged()
    state = ReconcilerState.objects.get()
    assert (state.runs, state.passes_completed, state.repairs_total, state.cursor_agent_id) == (4, 1, 4, 0)
    # Wrapped: the next run starts again from the first agent.
    assert reconcile(15).cursor_agent_id == ids[14]


def test_the_periodic_task_uses_the_configured_batch(settings: Any):
    converged_fleet()
    settings.OPAMP_RECONCILE_BATCH_SIZE = 20
    assert reconcile_desired_state() == {
        "checked": 20,
        "repaired": 0,
        "cursor": sorted(Agent.objects.values_list("pk", flat=True))[19],
    }


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match=BATCH_TOO_SMALL.format(batch_size=0)):
        desired_state_reconcile(batch_size=0)


def test_the_reconciler_is_registered_as_a_periodic_task(settings: Any):
    from django.core.management import call_command
    from django_celery_beat.models import PeriodicTask

    call_command("register_periodic_tasks")
    task = PeriodicTask.objects.get(task="rollouts.tasks.reconcile_desired_state")
    assert task.enabled and task.interval.every == settings.OPAMP_RECONCILE_SECONDS == 60


def test_viewers_read_the_reconciler_state_and_nobody_writes_it(viewer_api: Any, api: Any, client: Any):
    url = reverse("desired-state-reconciler")
    empty = viewer_api.get(url)
    assert empty.status_code == 200
    assert (empty.json()["runs"], empty.json()["repairs_total"], empty.json()["last_run_at"]) == (0, 0, None)
    make_fleet(3)
    services.configuration_publish(
        configuration=services.configuration_create(name="prod", selector="env=prod", actor=None),
        files=STABLE,
        author=None,
    )
    AgentDesiredConfig.objects.filter(agent_id=Agent.objects.order_by("pk").first().pk).delete()
    reconcile(100)
    body = viewer_api.get(url).json()
    assert {k: body[k] for k in ("runs", "last_run_checked", "last_run_repaired", "repairs_total")} == {
        "runs": 1,
        "last_run_checked": 3,
        "last_run_repaired": 1,
        "repairs_total": 1,
    }
    assert body["last_run_at"] is not None
    for method in ("post", "put", "patch", "delete"):
        assert getattr(viewer_api, method)(url, {}, format="json").status_code == 403
        assert getattr(api, method)(url, {}, format="json").status_code == 405
    assert client.get(url).status_code in (401, 403)


def test_the_admin_shows_the_reconciler_read_only(admin_client: Any):
    reconcile(100)
    listing = admin_client.get(reverse("admin:rollouts_reconcilerstate_changelist"))
    assert listing.status_code == 200
    assert b"1 runs, 0 repairs" in listing.content
    page = admin_client.get(reverse("admin:rollouts_reconcilerstate_change", args=[1]))
    assert page.status_code == 200
    assert b'name="repairs_total"' not in page.content  # shown, not editable
    assert admin_client.get(reverse("admin:rollouts_reconcilerstate_add")).status_code == 403
