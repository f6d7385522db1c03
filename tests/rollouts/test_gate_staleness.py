"""When the gate last checked a rollout, and the flag when that is too long ago (no tick runs
while the Celery broker is down): on the API's rollout and on the rollout page."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from rollouts.models import Rollout
from rollouts.rollout_services.gate import gate_stale, rollout_tick
from rollouts.rollout_services.verbs import rollout_pause, rollout_start
from tests.rollouts.rollout_helpers import configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db


@pytest.fixture
def running() -> Rollout:
    make_fleet(200)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    rollout.refresh_from_db()
    return rollout


def test_a_tick_records_when_the_gate_checked_and_silence_makes_it_stale(running, settings):
    settings.OPAMP_ROLLOUT_TICK_SECONDS = 5
    settings.OPAMP_ROLLOUT_GATE_STALE_TICKS = 4
    assert running.gate_checked_at is None
    assert not gate_stale(running)  # just started: the first tick is not due yet
    assert gate_stale(running, running.started_at + timedelta(seconds=21))
    now = timezone.now()
    rollout_tick(rollout_id=running.pk, now=now)
    running.refresh_from_db()
    assert running.gate_checked_at == now
    assert not gate_stale(running, now + timedelta(seconds=20))
    assert gate_stale(running, now + timedelta(seconds=21))
    # Only a rollout the gate should be moving can be stale.
    rollout_pause(rollout=running, actor=None)
    running.refresh_from_db()
    assert not gate_stale(running, now + timedelta(hours=1))
    assert rollout_tick(rollout_id=running.pk, now=now + timedelta(hours=1)) == "idle (paused)"
    running.refresh_from_db()
    assert running.gate_checked_at == now


def test_the_api_and_the_rollout_page_show_the_last_check_and_flag_it_stale(running, api: APIClient, operator: Any):
    rollout_tick(rollout_id=running.pk)
    body = api.get(f"/api/v1/rollouts/{running.pk}/").json()
    assert body["gate_checked_at"] is not None and body["gate_stale"] is False
    page = Client()
    page.force_login(operator)
    html = page.get(f"/rollouts/{running.pk}/").content.decode()
    assert "Gate last checked" in html and "stale" not in html
    Rollout.objects.filter(pk=running.pk).update(gate_checked_at=timezone.now() - timedelta(minutes=5))
    body = api.get(f"/api/v1/rollouts/{running.pk}/").json()
    assert body["gate_stale"] is True
    listed = api.get("/api/v1/rollouts/").json()["results"]
    assert [r["gate_stale"] for r in listed if r["id"] == running.pk] == [True]
    html = page.get(f"/rollouts/{running.pk}/").content.decode()
    assert "stale, nothing advances this rollout" in html
