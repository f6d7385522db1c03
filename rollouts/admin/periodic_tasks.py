"""Celery beat's schedule in the admin: only what an operator may need to see.

django-celery-beat registers five admins (clocked, crontab, interval and solar schedules,
periodic tasks). The schedules are written from code at start (`fleet.periodic`), so
the schedule models are internal: they leave the admin. The periodic tasks stay, for
superusers only and read-mostly: a superuser sees what runs how often and may switch a task
off or on (e.g. stop advancing rollouts during an incident); nothing is added, deleted or
re-pointed here, since the next start writes the tasks back from code anyway.
"""

from __future__ import annotations

from typing import Any

# Imported first so its registrations exist before they are replaced below, whatever the
# order in which the admin modules are discovered.
import django_celery_beat.admin  # noqa: F401
from django.contrib import admin
from django.http import HttpRequest
from django_celery_beat.models import ClockedSchedule, CrontabSchedule, IntervalSchedule, PeriodicTask, SolarSchedule

INTERNAL_MODELS = (ClockedSchedule, CrontabSchedule, IntervalSchedule, SolarSchedule)
PERIODIC_TASK_FIELDS = (
    "name",
    "task",
    "enabled",
    "interval",
    "crontab",
    "clocked",
    "solar",
    "one_off",
    "last_run_at",
    "total_run_count",
    "date_changed",
    "description",
)

for model in (*INTERNAL_MODELS, PeriodicTask):
    if admin.site.is_registered(model):
        admin.site.unregister(model)


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(admin.ModelAdmin):
    list_display = ("name", "task", "enabled", "interval", "last_run_at", "total_run_count")
    list_filter = ("enabled",)
    fields = PERIODIC_TASK_FIELDS
    readonly_fields = tuple(name for name in PERIODIC_TASK_FIELDS if name != "enabled")

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_superuser)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
