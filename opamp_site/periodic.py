"""The project's periodic tasks, declared in code and written to django-celery-beat's tables."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db import transaction


@dataclass(frozen=True)
class PeriodicTaskSpec:
    name: str
    task: str
    every_seconds: int


PERIODIC_TASKS = [
    PeriodicTaskSpec("fleet: sweep stale connections", "fleet.tasks.sweep_stale_connections", 30),
    PeriodicTaskSpec("rollouts: advance", "rollouts.tasks.advance_rollouts", settings.OPAMP_ROLLOUT_TICK_SECONDS),
    PeriodicTaskSpec("rollouts: prune the desired-state log", "rollouts.tasks.prune_desired_state_log", 600),
    PeriodicTaskSpec(
        "rollouts: reconcile desired state",
        "rollouts.tasks.reconcile_desired_state",
        settings.OPAMP_RECONCILE_SECONDS,
    ),
    # Hourly, against a nextUpdate of OPAMP_CRL_NEXT_UPDATE_HOURS (24 by default).
    PeriodicTaskSpec("signing: refresh the CRL file", "signing.tasks.refresh_crl", 3600),
]


@transaction.atomic
def register_periodic_tasks() -> list[tuple[str, bool]]:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    results = []
    for spec in PERIODIC_TASKS:
        schedule, _ = IntervalSchedule.objects.get_or_create(every=spec.every_seconds, period=IntervalSchedule.SECONDS)
        _, created = PeriodicTask.objects.update_or_create(
            name=spec.name, defaults={"task": spec.task, "interval": schedule, "enabled": True}
        )
        results.append((spec.name, created))
    return results
