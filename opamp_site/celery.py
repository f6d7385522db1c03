"""The Celery application. Broker from settings: Redis in production, a SQLite file by default.

Periodic tasks live in django-celery-beat's database scheduler and are registered by
`manage.py register_periodic_tasks` (run by the start scripts; each app declares its tasks in its
AppConfig.ready, see fleet.periodic), never by hand.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opamp_site.settings.base")

app = Celery("opamp_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
