"""Celery beat's internal schedule models are out of the admin; its periodic tasks stay,
for superusers, read-mostly."""

from __future__ import annotations

import pytest
from django.test import Client
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from fleet.periodic import register_periodic_tasks
from fleet.roles import OPERATOR, grant_role
from tests.fleet.factories import UserFactory

pytestmark = pytest.mark.django_db

INTERNAL_URLS = [
    "/admin/django_celery_beat/clockedschedule/",
    "/admin/django_celery_beat/crontabschedule/",
    "/admin/django_celery_beat/intervalschedule/",
    "/admin/django_celery_beat/solarschedule/",
]
TASKS_URL = "/admin/django_celery_beat/periodictask/"


@pytest.fixture
def advance() -> PeriodicTask:
    register_periodic_tasks()
    return PeriodicTask.objects.get(task="rollouts.tasks.advance_rollouts")


def index_models(client: Client) -> set[str]:
    page = client.get("/admin/")
    assert page.status_code == 200
    return {model["object_name"] for app in page.context["app_list"] for model in app["models"]}


def test_the_index_shows_superusers_the_periodic_tasks_and_none_of_the_schedule_models(admin_client, advance):
    assert index_models(admin_client) & {
        "ClockedSchedule",
        "CrontabSchedule",
        "IntervalSchedule",
        "SolarSchedule",
        "PeriodicTask",
    } == {"PeriodicTask"}
    for url in INTERNAL_URLS:
        assert admin_client.get(url).status_code == 404, url
    listing = admin_client.get(TASKS_URL)
    assert listing.status_code == 200
    assert b"rollouts: advance" in listing.content


def test_operators_on_staff_do_not_see_the_schedule(advance):
    user = UserFactory(username="staff-operator", is_staff=True)
    grant_role(user=user, role=OPERATOR)
    client = Client()
    client.force_login(user)
    assert "PeriodicTask" not in index_models(client)
    assert client.get(TASKS_URL).status_code == 403
    assert client.get(f"{TASKS_URL}{advance.pk}/change/").status_code == 403


def test_periodic_tasks_can_be_switched_off_and_on_but_not_added_deleted_or_re_pointed(admin_client, advance):
    interval = advance.interval
    other = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    change = f"{TASKS_URL}{advance.pk}/change/"
    assert admin_client.get(change).status_code == 200
    answer = admin_client.post(change, {"task": "fleet.tasks.sweep_stale_connections", "interval": other.pk})
    assert answer.status_code == 302
    advance.refresh_from_db()
    assert (advance.enabled, advance.task, advance.interval) == (False, "rollouts.tasks.advance_rollouts", interval)
    admin_client.post(change, {"enabled": "on"})
    advance.refresh_from_db()
    assert advance.enabled
    assert admin_client.get(f"{TASKS_URL}add/").status_code == 403
    assert admin_client.get(f"{TASKS_URL}{advance.pk}/delete/").status_code == 403
    assert not CrontabSchedule.objects.exists()
