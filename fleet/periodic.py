"""The project's periodic tasks: each app declares its own in `AppConfig.ready()`, and
`manage.py register_periodic_tasks` writes them all to django-celery-beat's tables."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django_celery_beat.models import IntervalSchedule, PeriodicTask


@dataclass(frozen=True)
class PeriodicTaskSpec:
    name: str
    task: str
    # Seconds between runs, or the name of the setting that holds them (read when the
    # tasks are registered, so tests and deployments can change it).
    every: int | str

    def every_seconds(self) -> int:
        return int(getattr(settings, self.every)) if isinstance(self.every, str) else self.every


_specs: dict[str, PeriodicTaskSpec] = {}


def declare(*specs: PeriodicTaskSpec) -> None:
    """Called from an AppConfig.ready(); a spec of the same name replaces the earlier one."""
    for spec in specs:
        _specs[spec.name] = spec


def declared() -> list[PeriodicTaskSpec]:
    return list(_specs.values())


@transaction.atomic
def register_periodic_tasks() -> list[tuple[str, bool]]:
    results = []
    for spec in declared():
        schedule, _ = IntervalSchedule.objects.get_or_create(
            every=spec.every_seconds(), period=IntervalSchedule.SECONDS
        )
        _, created = PeriodicTask.objects.update_or_create(
            name=spec.name, defaults={"task": spec.task, "interval": schedule, "enabled": True}
        )
        results.append((spec.name, created))
    return results
