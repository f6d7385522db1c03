"""The rollouts API: drafts and dry runs, validation, the verbs, status per stage, the
timeline, roles, audit and the schema."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from fleet.models import AuditEvent
from fleet.roles import WRITE_DENIED
from rollouts.errors import NO_SUCH_VERSION
from rollouts.models import Configuration, ConfigVersion, Rollout, RolloutEvent, RolloutState, RolloutTarget
from rollouts.rollout_services.creation import CANDIDATE_IS_STABLE, NO_STAGES, STAGE_SIZE, STAGES_NOT_NESTED
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import NOT_IN_STATE, ROLLOUT_ACTIVE
from tests.rollouts.rollout_helpers import answer_all, configuration_with_candidate, make_fleet

pytestmark = pytest.mark.django_db
Kind = RolloutEvent.Kind

FLEET_SIZE = 200
STAGES = [{"percent": 10}, {"percent": 50}, {"percent": 100}]
VERBS = ("start", "pause", "resume", "promote", "abort", "retry")


@pytest.fixture
def fleet() -> tuple[Configuration, ConfigVersion, ConfigVersion]:
    """200 agents selected by the configuration `fleet`: stable version 1, candidate version 2."""
    make_fleet(FLEET_SIZE)
    return configuration_with_candidate()


def rollout_body(**overrides: Any) -> dict[str, Any]:
    return {"configuration": "fleet", "candidate_version": 2, "stages": STAGES, "salt": "s", **overrides}


def create(api: APIClient, **overrides: Any) -> dict[str, Any]:
    response = api.post("/api/v1/rollouts/", rollout_body(**overrides), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def verb(api: APIClient, rollout_id: int, name: str, body: Any = None) -> Any:
    return api.post(f"/api/v1/rollouts/{rollout_id}/{name}/", body, format="json")


def tick(rollout_id: int) -> str:
    return rollout_tick(rollout_id=rollout_id)


def rolled_back(api: APIClient) -> dict[str, Any]:
    """A rollout that ran, was aborted, and whose agents all run the stable version again."""
    rollout = create(api)
    assert verb(api, rollout["id"], "start").status_code == 200
    answer_all()
    assert verb(api, rollout["id"], "abort").status_code == 200
    answer_all()
    assert tick(rollout["id"]) == "rolled back"
    return rollout


# Creating


def test_an_operator_creates_a_draft_and_the_stages_are_echoed(api, fleet):
    body = create(
        api,
        stages=[{"percent": 1, "hold_seconds": 3600}, {"count": 50, "selector": "env=prod"}, {"percent": 100}],
        max_failure_rate=0.01,
        note="canary first",
    )
    assert body["state"] == RolloutState.DRAFT
    assert (body["configuration"], body["stable_version"], body["candidate_version"]) == ("fleet", 1, 2)
    assert body["created_by"] == "olivia"
    assert body["max_failure_rate"] == 0.01 and body["note"] == "canary first" and body["salt"] == "s"
    assert [(s["index"], s["percent"], s["count"], s["hold_seconds"]) for s in body["stages"]] == [
        (0, 1.0, None, 3600.0),
        (1, None, 50, 0.0),
        (2, 100.0, None, 0.0),
    ]
    assert body["stages"][1]["selector"] == {"matchLabels": {"env": "prod"}}
    assert all(stage["counts"] is None for stage in body["stages"])
    assert Rollout.objects.get(pk=body["id"]).stages.count() == 3
    assert not RolloutTarget.objects.exists()


def test_a_dry_run_shows_cohort_sizes_that_add_up_to_the_fleet_and_creates_nothing(api, fleet):
    response = api.post("/api/v1/rollouts/", rollout_body(dry_run=True), format="json")
    assert response.status_code == 200
    assert response.json()["salt"] == "s"
    stages = response.json()["stages"]
    assert [stage["index"] for stage in stages] == [0, 1, 2]
    assert sum(stage["cohort_size"] for stage in stages) == FLEET_SIZE
    assert stages[-1]["cumulative"] == FLEET_SIZE
    assert 0 < stages[0]["cohort_size"] < stages[1]["cumulative"] < FLEET_SIZE
    assert len(stages[0]["sample"]) == min(stages[0]["cohort_size"], 20)
    assert not Rollout.objects.exists()
    assert not RolloutTarget.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="rollout.").exists()


def test_a_dry_run_draws_the_same_cohorts_as_the_rollout_with_the_same_salt(api, fleet):
    dry = api.post("/api/v1/rollouts/", rollout_body(dry_run=True), format="json").json()["stages"]
    rollout = create(api)
    verb(api, rollout["id"], "start")
    first_stage = {str(uid) for uid in RolloutTarget.objects.values_list("agent__instance_uid", flat=True)}
    assert len(first_stage) == dry[0]["cohort_size"]
    assert set(dry[0]["sample"]) <= first_stage


def test_a_dry_run_without_a_salt_returns_the_one_it_drew_and_creating_with_it_takes_the_same_agents(api, fleet):
    body = rollout_body(dry_run=True, stages=[{"percent": 5}, {"percent": 100}])
    del body["salt"]
    dry = api.post("/api/v1/rollouts/", body, format="json").json()
    assert len(dry["salt"]) >= 16
    other = api.post("/api/v1/rollouts/", body, format="json").json()
    assert other["salt"] != dry["salt"]
    rollout = create(api, stages=[{"percent": 5}, {"percent": 100}], salt=dry["salt"])
    assert rollout["salt"] == dry["salt"]
    verb(api, rollout["id"], "start")
    first_stage = sorted(str(uid) for uid in RolloutTarget.objects.values_list("agent__instance_uid", flat=True))
    assert len(first_stage) == dry["stages"][0]["cohort_size"] > 0
    assert first_stage[:20] == dry["stages"][0]["sample"]


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"stages": []}, NO_STAGES),
        ({"stages": [{"percent": 10, "count": 5}, {"percent": 100}]}, STAGE_SIZE.format(index=0)),
        ({"stages": [{"hold_seconds": 60}]}, STAGE_SIZE.format(index=0)),
        ({"stages": [{"percent": 0}, {"percent": 100}]}, STAGE_SIZE.format(index=0)),
        ({"stages": [{"percent": 10}, {"percent": 5}]}, STAGES_NOT_NESTED.format(index=1)),
        ({"stages": [{"count": 50}, {"count": 10}]}, STAGES_NOT_NESTED.format(index=1)),
        (
            {"stages": [{"percent": 10}, {"percent": 100, "selector": "tier in ()"}]},
            'stage 1: "tier in ()": operator In needs at least one value',
        ),
        ({"candidate_version": 99}, NO_SUCH_VERSION.format(name="fleet", number=99)),
        ({"candidate_version": 1}, CANDIDATE_IS_STABLE.format(number=1, name="fleet")),
    ],
    ids=[
        "no stages",
        "percent and count both",
        "neither percent nor count",
        "zero percent",
        "shrinking percent",
        "shrinking count",
        "bad selector",
        "unknown candidate number",
        "candidate equal to stable",
    ],
)
def test_an_invalid_rollout_is_refused_with_400_and_a_clear_message(api, fleet, overrides, detail):
    response = api.post("/api/v1/rollouts/", rollout_body(**overrides), format="json")
    assert response.status_code == 400
    assert response.json()["detail"] == detail
    assert detail in response.json()["problems"]
    assert not Rollout.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="rollout.").exists()


def test_stage_errors_name_the_stages_field(api, fleet):
    response = api.post("/api/v1/rollouts/", rollout_body(stages=[{"percent": 10}, {"percent": 5}]), format="json")
    assert response.json()["field"] == "stages"
    response = api.post("/api/v1/rollouts/", rollout_body(candidate_version=99), format="json")
    assert response.json()["field"] == "candidate_version"


def test_a_percent_above_100_is_refused_by_the_input_check(api, fleet):
    response = api.post("/api/v1/rollouts/", rollout_body(stages=[{"percent": 150}]), format="json")
    assert response.status_code == 400
    assert "less than or equal to 100" in str(response.json()["stages"])
    assert not Rollout.objects.exists()


def test_a_rollout_of_an_unknown_configuration_is_404(api, fleet):
    response = api.post("/api/v1/rollouts/", rollout_body(configuration="nope"), format="json")
    assert response.status_code == 404
    assert not Rollout.objects.exists()


# Starting and status


def test_starting_a_draft_makes_it_running_and_the_detail_counts_each_stage(api, fleet):
    rollout = create(api)
    response = verb(api, rollout["id"], "start")
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == RolloutState.RUNNING and body["stage_index"] == 0
    assert body["started_at"] is not None
    first = RolloutTarget.objects.filter(rollout_id=rollout["id"], stage_index=0).count()
    assert 0 < first < FLEET_SIZE
    counts = body["stages"][0]["counts"]
    assert counts["targeted"] == counts["pending"] == counts["reachable"] == first
    assert counts["applied"] == counts["failed"] == 0
    assert body["stages"][1]["counts"] is None and body["stages"][2]["counts"] is None
    assert [stage["bucket_threshold"] for stage in body["stages"]] == [1000, 5000, 10000]


def test_the_detail_counts_the_answers_of_the_agents(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    answer_all()
    counts = api.get(f"/api/v1/rollouts/{rollout['id']}/").json()["stages"][0]["counts"]
    assert counts["applied"] == counts["reported"] == counts["targeted"] > 0
    assert counts["pending"] == 0 and counts["failure_rate"] == 0.0


def test_the_list_shows_rollouts_newest_first_and_filters_by_state(api, fleet):
    first = create(api)
    second = create(api)
    verb(api, first["id"], "start")
    listing = api.get("/api/v1/rollouts/").json()
    assert [row["id"] for row in listing["results"]] == [second["id"], first["id"]]
    running = api.get("/api/v1/rollouts/?state=running").json()
    assert [row["id"] for row in running["results"]] == [first["id"]]


# Verbs in the wrong state


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("pause", "running"),
        ("resume", "paused"),
        ("promote", "running or paused"),
        ("retry", "rolled_back or aborted"),
    ],
)
def test_a_verb_on_a_draft_that_needs_another_state_is_409(api, fleet, name, wanted):
    rollout = create(api)
    response = verb(api, rollout["id"], name)
    assert response.status_code == 409
    assert response.json()["detail"] == NOT_IN_STATE.format(
        rollout_id=rollout["id"], state="draft", verb=name, wanted=wanted
    )
    assert Rollout.objects.get(pk=rollout["id"]).state == RolloutState.DRAFT
    assert list(RolloutEvent.objects.filter(rollout_id=rollout["id"]).values_list("kind", flat=True)) == [Kind.CREATED]


@pytest.mark.parametrize("name", ["start", "resume", "retry"])
def test_a_verb_on_a_running_rollout_that_needs_another_state_is_409(api, fleet, name):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    response = verb(api, rollout["id"], name)
    assert response.status_code == 409
    assert "rollout {} is running; {} needs it".format(rollout["id"], name) in response.json()["detail"]
    assert Rollout.objects.get(pk=rollout["id"]).state == RolloutState.RUNNING


@pytest.mark.parametrize("name", VERBS)
def test_no_verb_moves_a_succeeded_rollout(api, fleet, name):
    rollout = create(api, stages=[{"percent": 100}])
    verb(api, rollout["id"], "start")
    answer_all()
    assert tick(rollout["id"]) == "succeeded"
    assert verb(api, rollout["id"], name).status_code == 409
    assert Rollout.objects.get(pk=rollout["id"]).state == RolloutState.SUCCEEDED


def test_starting_a_second_rollout_of_the_same_configuration_is_409(api, fleet):
    first = create(api)
    second = create(api)
    verb(api, first["id"], "start")
    response = verb(api, second["id"], "start")
    assert response.status_code == 409
    assert response.json()["detail"] == ROLLOUT_ACTIVE.format(name="fleet", rollout_id=first["id"])
    assert Rollout.objects.get(pk=second["id"]).state == RolloutState.DRAFT


def test_a_verb_on_an_unknown_rollout_is_404(api, fleet):
    assert verb(api, 999999, "start").status_code == 404


# Verbs, the happy paths


def test_pausing_and_resuming_a_running_rollout(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    paused = verb(api, rollout["id"], "pause")
    assert paused.status_code == 200 and paused.json()["state"] == RolloutState.PAUSED
    answer_all()
    assert tick(rollout["id"]) == "idle (paused)"
    resumed = verb(api, rollout["id"], "resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == RolloutState.RUNNING
    assert tick(rollout["id"]) == "stage 1 started"


def test_promoting_skips_to_the_last_stage_and_the_gate_then_finishes_it(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    response = verb(api, rollout["id"], "promote")
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == RolloutState.RUNNING and body["stage_index"] == 2
    assert RolloutTarget.objects.filter(rollout_id=rollout["id"]).count() == FLEET_SIZE
    answer_all()
    assert tick(rollout["id"]) == "succeeded"
    assert Configuration.objects.get(name="fleet").current_version.number == 2


def test_a_paused_rollout_may_be_promoted(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    verb(api, rollout["id"], "pause")
    body = verb(api, rollout["id"], "promote").json()
    assert body["state"] == RolloutState.RUNNING and body["stage_index"] == 2


def test_aborting_a_running_rollout_rolls_it_back(api, fleet):
    _, stable, _ = fleet
    rollout = create(api)
    verb(api, rollout["id"], "start")
    answer_all()
    response = verb(api, rollout["id"], "abort")
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == RolloutState.ROLLING_BACK
    assert body["rollback"]["targeted"] == body["rollback"]["waiting"] > 0
    answer_all()
    assert tick(rollout["id"]) == "rolled back"
    detail = api.get(f"/api/v1/rollouts/{rollout['id']}/").json()
    assert detail["state"] == RolloutState.ROLLED_BACK
    assert detail["rollback"]["reverted"] == detail["rollback"]["targeted"]
    assert Configuration.objects.get(name="fleet").current_version == stable


def test_aborting_a_draft_cancels_it(api, fleet):
    rollout = create(api)
    body = verb(api, rollout["id"], "abort").json()
    assert body["state"] == RolloutState.ABORTED
    assert body["finished_at"] is not None
    assert not RolloutTarget.objects.exists()


def test_aborting_a_rollout_that_is_already_rolling_back_is_409(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    verb(api, rollout["id"], "abort")
    assert verb(api, rollout["id"], "abort").status_code == 409


def test_retrying_a_rolled_back_rollout_starts_again_from_the_first_stage(api, fleet):
    rollout = rolled_back(api)
    response = verb(api, rollout["id"], "retry")
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == RolloutState.RUNNING and body["stage_index"] == 0
    assert body["finished_at"] is None
    targets = RolloutTarget.objects.filter(rollout_id=rollout["id"])
    assert targets.exists() and set(targets.values_list("stage_index", flat=True)) == {0}
    assert not targets.filter(reverted_at__isnull=False).exists()


def test_retrying_an_aborted_draft_gives_the_candidate_to_the_first_stage_only(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "abort")
    body = verb(api, rollout["id"], "retry").json()
    assert body["state"] == RolloutState.RUNNING and body["stage_index"] == 0
    first = RolloutTarget.objects.filter(rollout_id=rollout["id"], stage_index=0).count()
    assert 0 < first < FLEET_SIZE


def test_approving_a_stage_lets_the_gate_start_it(api, operator, fleet):
    rollout = create(api, stages=[{"percent": 10}, {"percent": 100, "requires_approval": True}])
    verb(api, rollout["id"], "start")
    answer_all()
    assert tick(rollout["id"]) == "holding: awaiting approval"
    response = verb(api, rollout["id"], "approve", {"stage": 1})
    assert response.status_code == 200
    stage = response.json()["stages"][1]
    assert stage["approved_by"] == "olivia" and stage["approved_at"] is not None
    assert tick(rollout["id"]) == "stage 1 started"


def test_approving_needs_a_stage_number(api, fleet):
    rollout = create(api, stages=[{"percent": 10}, {"percent": 100, "requires_approval": True}])
    response = verb(api, rollout["id"], "approve", {})
    assert response.status_code == 400
    assert "stage" in response.json()


# The timeline


def test_the_events_are_the_timeline_in_order_with_their_actors(api, fleet):
    rollout = create(api)
    for name in ("start", "pause", "resume", "abort"):
        assert verb(api, rollout["id"], name).status_code == 200
    response = api.get(f"/api/v1/rollouts/{rollout['id']}/events/")
    assert response.status_code == 200
    events = response.json()
    assert [(e["kind"], e["from_state"], e["to_state"]) for e in events] == [
        (Kind.CREATED, "", "draft"),
        (Kind.STARTED, "draft", "running"),
        (Kind.PAUSED, "running", "paused"),
        (Kind.RESUMED, "paused", "running"),
        (Kind.ROLLBACK_STARTED, "running", "rolling_back"),
    ]
    assert {e["actor"] for e in events} == {"olivia"}
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)


def test_the_gate_writes_its_decisions_on_the_timeline_with_counts(api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    answer_all()
    tick(rollout["id"])
    last = api.get(f"/api/v1/rollouts/{rollout['id']}/events/").json()[-1]
    assert last["kind"] == Kind.STAGE_STARTED and last["stage_index"] == 1
    assert last["actor"] is None
    assert last["counts"]["applied"] == last["counts"]["targeted"] > 0


# Roles


@pytest.mark.parametrize(
    ("name", "body"),
    [*((name, None) for name in VERBS), ("approve", {"stage": 1})],
)
def test_a_viewer_cannot_use_the_verbs(viewer_api, api, fleet, name, body):
    rollout = create(api)
    response = verb(viewer_api, rollout["id"], name, body)
    assert response.status_code == 403
    assert response.json()["detail"] == WRITE_DENIED
    assert Rollout.objects.get(pk=rollout["id"]).state == RolloutState.DRAFT


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_viewer_cannot_create_a_rollout_or_a_dry_run(viewer_api, fleet, dry_run):
    response = viewer_api.post("/api/v1/rollouts/", rollout_body(dry_run=dry_run), format="json")
    assert response.status_code == 403
    assert response.json()["detail"] == WRITE_DENIED
    assert not Rollout.objects.exists()


def test_a_viewer_can_read_rollouts_their_detail_and_their_events(viewer_api, api, fleet):
    rollout = create(api)
    verb(api, rollout["id"], "start")
    for url in ["/api/v1/rollouts/", f"/api/v1/rollouts/{rollout['id']}/", f"/api/v1/rollouts/{rollout['id']}/events/"]:
        assert viewer_api.get(url).status_code == 200, url
    assert viewer_api.get(f"/api/v1/rollouts/{rollout['id']}/").json()["stages"][0]["counts"]["targeted"] > 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", ""),
        ("post", ""),
        ("get", "{id}/"),
        ("get", "{id}/events/"),
        *(("post", f"{{id}}/{name}/") for name in (*VERBS, "approve")),
    ],
)
def test_anonymous_requests_are_refused_with_401(api, fleet, method, path):
    rollout = create(api)
    response = getattr(APIClient(), method)("/api/v1/rollouts/" + path.format(id=rollout["id"]), {}, format="json")
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers
    assert Rollout.objects.get(pk=rollout["id"]).state == RolloutState.DRAFT


# Audit


def rollout_audit() -> list[tuple[str, str | None, str, str]]:
    rows = AuditEvent.objects.filter(action__startswith="rollout.").order_by("at", "id")
    return [(e.action, e.actor.username if e.actor else None, e.target_type, e.target_id) for e in rows]


def test_every_write_through_the_api_is_audited_with_its_actor(api, fleet):
    rollout = create(api, stages=[{"percent": 10}, {"percent": 50, "requires_approval": True}, {"percent": 100}])
    rid = rollout["id"]
    steps = [("start", None), ("approve", {"stage": 1}), ("pause", None), ("resume", None), ("promote", None)]
    for name, body in steps:
        assert verb(api, rid, name, body).status_code == 200, name
    answer_all()
    assert verb(api, rid, "abort").status_code == 200
    answer_all()
    assert tick(rid) == "rolled back"
    assert verb(api, rid, "retry").status_code == 200
    expected = ["create", "start", "approve", "pause", "resume", "promote", "abort", "retry"]
    assert rollout_audit() == [(f"rollout.{action}", "olivia", "Rollout", str(rid)) for action in expected]
    created = AuditEvent.objects.get(action="rollout.create")
    assert created.details["configuration"] == "fleet" and created.details["candidate"] == 2
    assert AuditEvent.objects.get(action="rollout.approve").details == {"stage": 1}


def test_refused_writes_are_not_audited(api, fleet):
    rollout = create(api)
    assert verb(api, rollout["id"], "pause").status_code == 409
    assert verb(api, rollout["id"], "retry").status_code == 409
    api.post("/api/v1/rollouts/", rollout_body(stages=[]), format="json")
    assert [row[0] for row in rollout_audit()] == ["rollout.create"]


# The schema


def test_the_openapi_schema_lists_the_rollout_paths(api):
    response = api.get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/rollouts/"])
    assert "get" in paths["/api/v1/rollouts/{id}/"]
    assert "get" in paths["/api/v1/rollouts/{id}/events/"]
    for name in (*VERBS, "approve"):
        assert "post" in paths[f"/api/v1/rollouts/{{id}}/{name}/"], name


def test_a_misspelt_stage_key_is_refused_not_dropped(api, fleet):
    response = api.post(
        "/api/v1/rollouts/",
        {"configuration": "fleet", "candidate_version": 2, "stages": [{"percent": 100, "requires_aproval": True}]},
        format="json",
    )
    assert response.status_code == 400
    assert "requires_aproval" in str(response.json())


def test_approving_a_stage_that_does_not_exist_is_a_clear_error(api, fleet):
    rollout = create(api)
    response = api.post(f"/api/v1/rollouts/{rollout['id']}/approve/", {"stage": 9}, format="json")
    assert response.status_code == 400
    assert "has no stage 9" in response.json()["detail"]
