"""The rollout admin: read-only pages with stage counts and the timeline, and actions that
run the engine's verbs under the same roles as the API."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.utils.html import escape

from fleet.models import AuditEvent
from fleet.roles import OPERATOR, VIEWER, grant_role
from rollouts.admin.rollouts import NOTHING_TO_APPROVE, ROLLOUT_VERB_DONE, STAGE_UNKNOWN_FIELD, STAGES_NOT_A_LIST
from rollouts.errors import NO_SUCH_VERSION
from rollouts.models import Configuration, ConfigVersion, Rollout, RolloutEvent, RolloutState, RolloutTarget
from rollouts.rollout_services.creation import STAGES_NOT_NESTED, StageSpec, rollout_create
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import NOT_IN_STATE, rollout_abort, rollout_pause, rollout_start
from tests.fleet.factories import UserFactory
from tests.rollouts.rollout_helpers import answer_all, configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db
Kind = RolloutEvent.Kind
CHANGELIST = "/admin/rollouts/rollout/"


@pytest.fixture
def fleet() -> tuple[Configuration, ConfigVersion, ConfigVersion]:
    """1,000 agents of the configuration `fleet`: stable version 1, candidate version 2."""
    make_fleet(1000)
    return configuration_with_candidate()


@pytest.fixture
def draft(fleet: tuple[Configuration, ConfigVersion, ConfigVersion]) -> Rollout:
    configuration, _, candidate = fleet
    return standard_rollout(configuration, candidate)


@pytest.fixture
def running(draft: Rollout) -> Rollout:
    assert rollout_start(rollout=draft, actor=None)
    draft.refresh_from_db()
    return draft


def staff_client(username: str, role: str) -> Client:
    user = UserFactory(username=username, is_staff=True)
    grant_role(user=user, role=role)
    client = Client()
    client.force_login(user)
    return client


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def run_action(client: Client, action: str, *rollouts: Rollout) -> Any:
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [r.pk for r in rollouts], "index": 0}, follow=True
    )


def state_of(rollout: Rollout) -> str:
    return Rollout.objects.values_list("state", flat=True).get(pk=rollout.pk)


def kinds_of(rollout: Rollout) -> list[str]:
    return list(rollout.events.values_list("kind", flat=True))


# Pages


def test_the_rollout_list_shows_configuration_versions_state_and_stage(admin_client, running):
    page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    (row,) = page.context["cl"].result_list
    assert row.pk == running.pk and row.stage_total == 3
    content = page.content.decode()
    assert "v1 → v2" in content
    assert "fleet" in content and "running" in content


def test_the_list_can_be_filtered_by_state(admin_client, running, fleet):
    configuration, _, candidate = fleet
    second = standard_rollout(configuration, candidate)
    page = admin_client.get(CHANGELIST + "?state__exact=draft")
    assert [row.pk for row in page.context["cl"].result_list] == [second.pk]


def test_the_rollout_page_shows_the_stages_with_their_counts_and_the_timeline(admin_client, running):
    answer_all()
    first = RolloutTarget.objects.filter(rollout=running, stage_index=0).count()
    page = admin_client.get(f"{CHANGELIST}{running.pk}/change/")
    assert page.status_code == 200
    content = page.content.decode()
    assert "stages and their agents" in content.lower()
    assert "1%" in content and "10%" in content and "100%" in content
    assert "(every agent)" in content
    assert f"<td>▶ 0</td><td>1%</td><td>(every agent)</td><td>0 s</td><td>not needed</td><td>{first}</td>" in content
    assert "timeline" in content.lower()
    assert re.findall(r'field-kind">\s*<p>(\w+)</p>', content) == ["Created", "Started"]
    assert 'name="_save"' not in content
    assert 'name="events-0-message"' not in content


def test_a_draft_page_renders_with_empty_counts(admin_client, draft):
    page = admin_client.get(f"{CHANGELIST}{draft.pk}/change/")
    assert page.status_code == 200
    assert "▶" not in page.content.decode()


def test_a_rolling_back_rollout_page_shows_the_rollback_progress(admin_client, running):
    answer_all()
    rollout_abort(rollout=running, actor=None)
    page = admin_client.get(f"{CHANGELIST}{running.pk}/change/")
    assert page.status_code == 200
    content = page.content.decode()
    assert "agents given the candidate" in content.lower()
    assert "waiting: " in content


def test_a_stage_awaiting_approval_says_so(admin_client, fleet):
    configuration, _, candidate = fleet
    rollout = rollout_create(
        configuration=configuration,
        candidate=candidate,
        stages=[StageSpec(percent=10), StageSpec(percent=100, requires_approval=True)],
        actor=None,
    )
    content = admin_client.get(f"{CHANGELIST}{rollout.pk}/change/").content.decode()
    assert "awaiting approval" in content


def test_rollouts_cannot_be_deleted_in_the_admin(admin_client, draft):
    assert admin_client.get(f"{CHANGELIST}{draft.pk}/delete/").status_code == 403
    assert Rollout.objects.filter(pk=draft.pk).exists()


def test_a_rollout_cannot_be_changed_through_its_page(admin_client, draft):
    response = admin_client.post(f"{CHANGELIST}{draft.pk}/change/", {"state": "succeeded", "note": "x"})
    assert response.status_code == 403
    assert state_of(draft) == RolloutState.DRAFT


# Actions


def test_the_start_action_starts_a_draft_rollout(admin_client, root, draft):
    response = run_action(admin_client, "start_rollouts", draft)
    assert response.status_code == 200
    assert ROLLOUT_VERB_DONE.format(rollout_id=draft.pk, done="started") in messages_of(response)
    assert state_of(draft) == RolloutState.RUNNING
    assert RolloutTarget.objects.filter(rollout=draft, stage_index=0).exists()
    event = draft.events.get(kind=Kind.STARTED)
    assert event.actor == root
    assert AuditEvent.objects.filter(action="rollout.start", actor=root, target_id=str(draft.pk)).exists()


def test_an_action_in_the_wrong_state_shows_an_error_and_changes_nothing(admin_client, draft):
    response = run_action(admin_client, "pause_rollouts", draft)
    assert response.status_code == 200
    expected = NOT_IN_STATE.format(rollout_id=draft.pk, state="draft", verb="pause", wanted="running")
    assert messages_of(response) == [f"rollout {draft.pk}: {expected}"]
    (message,) = get_messages(response.wsgi_request)
    assert message.level_tag == "error"
    assert state_of(draft) == RolloutState.DRAFT
    assert kinds_of(draft) == [Kind.CREATED]
    assert not AuditEvent.objects.filter(action="rollout.pause").exists()


def test_an_action_on_several_rollouts_reports_each_and_a_refusal_does_not_stop_the_rest(admin_client, running, fleet):
    configuration, _, candidate = fleet
    second = standard_rollout(configuration, candidate)
    response = run_action(admin_client, "abort_rollouts", running, second)
    assert messages_of(response) == [
        ROLLOUT_VERB_DONE.format(rollout_id=running.pk, done="aborted"),
        ROLLOUT_VERB_DONE.format(rollout_id=second.pk, done="aborted"),
    ]
    assert state_of(running) == RolloutState.ROLLING_BACK
    assert state_of(second) == RolloutState.ABORTED
    response = run_action(admin_client, "start_rollouts", running, second)
    assert [m.level_tag for m in get_messages(response.wsgi_request)] == ["error", "error"]
    assert state_of(running) == RolloutState.ROLLING_BACK and state_of(second) == RolloutState.ABORTED


def test_the_verb_actions_walk_a_rollout_through_its_states(admin_client, running):
    for action, expected in [
        ("pause_rollouts", RolloutState.PAUSED),
        ("resume_rollouts", RolloutState.RUNNING),
        ("promote_rollouts", RolloutState.RUNNING),
        ("abort_rollouts", RolloutState.ROLLING_BACK),
    ]:
        response = run_action(admin_client, action, running)
        assert [m.level_tag for m in get_messages(response.wsgi_request)] == ["success"], action
        assert state_of(running) == expected, action
    answer_all()
    assert rollout_tick(rollout_id=running.pk) == "rolled back"
    run_action(admin_client, "retry_rollouts", running)
    assert state_of(running) == RolloutState.RUNNING
    assert kinds_of(running) == [
        Kind.CREATED,
        Kind.STARTED,
        Kind.PAUSED,
        Kind.RESUMED,
        Kind.PROMOTED,
        Kind.ROLLBACK_STARTED,
        Kind.ROLLED_BACK,
        Kind.RETRIED,
    ]


def test_the_approve_action_approves_the_next_stage_that_needs_it(admin_client, root, fleet):
    configuration, _, candidate = fleet
    rollout = rollout_create(
        configuration=configuration,
        candidate=candidate,
        stages=[StageSpec(percent=10), StageSpec(percent=100, requires_approval=True)],
        actor=None,
    )
    rollout_start(rollout=rollout, actor=None)
    response = run_action(admin_client, "approve_next_stage", rollout)
    assert messages_of(response) == [ROLLOUT_VERB_DONE.format(rollout_id=rollout.pk, done="stage 1 approved")]
    assert rollout.stages.get(index=1).approved_by == root
    response = run_action(admin_client, "approve_next_stage", rollout)
    assert messages_of(response) == [NOTHING_TO_APPROVE.format(rollout_id=rollout.pk)]


# Creating a draft


def test_the_add_form_creates_a_draft_through_the_engine(admin_client, root, fleet):
    stages = [{"percent": 5, "hold_seconds": 60}, {"percent": 100}]
    response = admin_client.post(
        f"{CHANGELIST}add/",
        {
            "configuration": fleet[0].pk,
            "candidate_version": 2,
            "stages": json.dumps(stages),
            "max_failure_rate": "0.01",
            "apply_timeout_seconds": "300",
            "min_reporting": "1",
            "auto_rollback": "on",
            "salt": "",
            "note": "from the admin",
        },
    )
    assert response.status_code == 302
    rollout = Rollout.objects.get()
    assert rollout.state == RolloutState.DRAFT and rollout.created_by == root
    assert (rollout.stable_version.number, rollout.candidate_version.number) == (1, 2)
    assert list(rollout.stages.values_list("percent", "hold_seconds")) == [(5.0, 60.0), (100.0, 0.0)]
    assert rollout.salt and rollout.note == "from the admin"
    assert kinds_of(rollout) == [Kind.CREATED]
    assert AuditEvent.objects.filter(action="rollout.create", actor=root).exists()


def add_form(**overrides: Any) -> dict[str, Any]:
    return {
        "candidate_version": 2,
        "stages": json.dumps([{"percent": 10}, {"percent": 100}]),
        "max_failure_rate": "0.001",
        "apply_timeout_seconds": "300",
        "min_reporting": "1",
        **overrides,
    }


def test_the_add_form_renders(admin_client, fleet):
    page = admin_client.get(f"{CHANGELIST}add/")
    assert page.status_code == 200
    assert 'name="stages"' in page.content.decode()


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"candidate_version": 9}, NO_SUCH_VERSION.format(name="fleet", number=9)),
        ({"stages": "[{"}, "the stages are not valid JSON"),
        ({"stages": '{"percent": 10}'}, STAGES_NOT_A_LIST),
        ({"stages": '[{"percent": 150}]'}, "stage 0: percent: Ensure this value is less than or equal to 100."),
        (
            {"stages": '[{"percent": 100, "requires_aproval": true}]'},
            STAGE_UNKNOWN_FIELD.format(
                index=0, name="requires_aproval", known="count, hold_seconds, percent, requires_approval, selector"
            ),
        ),
    ],
    ids=["unknown candidate", "not JSON", "not a list", "percent above 100", "misspelt field"],
)
def test_bad_add_input_is_a_form_error(admin_client, fleet, overrides, problem):
    response = admin_client.post(f"{CHANGELIST}add/", add_form(configuration=fleet[0].pk, **overrides))
    assert response.status_code == 200
    assert escape(problem) in response.content.decode()
    assert not Rollout.objects.exists()


def test_a_refusal_of_the_engine_is_shown_as_a_message_and_nothing_is_created(admin_client, fleet):
    stages = json.dumps([{"percent": 10}, {"percent": 5}])
    response = admin_client.post(f"{CHANGELIST}add/", add_form(configuration=fleet[0].pk, stages=stages), follow=True)
    assert response.status_code == 200
    assert STAGES_NOT_NESTED.format(index=1) in messages_of(response)
    assert not Rollout.objects.exists()
    assert not AuditEvent.objects.filter(action="rollout.create").exists()


# Roles


def test_a_viewer_sees_rollouts_but_has_no_actions_and_cannot_add(running):
    client = staff_client("victor", VIEWER)
    page = client.get(CHANGELIST)
    assert page.status_code == 200
    assert 'name="action"' not in page.content.decode()
    assert client.get(f"{CHANGELIST}{running.pk}/change/").status_code == 200
    assert client.get(f"{CHANGELIST}add/").status_code == 403
    response = run_action(client, "pause_rollouts", running)
    assert response.status_code == 200
    assert state_of(running) == RolloutState.RUNNING
    assert not AuditEvent.objects.filter(action="rollout.pause").exists()


def test_a_staff_user_without_a_role_may_look_but_not_act(running):
    client = Client()
    client.force_login(UserFactory(username="sam", is_staff=True))
    assert client.get(CHANGELIST).status_code == 200
    run_action(client, "abort_rollouts", running)
    assert state_of(running) == RolloutState.RUNNING


def test_an_operator_may_run_the_actions(running):
    client = staff_client("olivia", OPERATOR)
    response = run_action(client, "pause_rollouts", running)
    assert messages_of(response) == [ROLLOUT_VERB_DONE.format(rollout_id=running.pk, done="paused")]
    assert state_of(running) == RolloutState.PAUSED
    assert running.events.get(kind=Kind.PAUSED).actor.username == "olivia"


def test_a_paused_rollout_can_be_resumed_by_an_operator(running):
    rollout_pause(rollout=running, actor=None)
    client = staff_client("olivia", OPERATOR)
    run_action(client, "resume_rollouts", running)
    assert state_of(running) == RolloutState.RUNNING
