"""Register (or update) the periodic tasks in django-celery-beat's database scheduler."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from fleet.periodic import register_periodic_tasks


class Command(BaseCommand):
    help = "Create or update every periodic task the project defines (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        for name, created in register_periodic_tasks():
            self.stdout.write(f"{'created' if created else 'updated'} {name}")
