from __future__ import annotations

from django.apps import AppConfig


class RolloutsConfig(AppConfig):
    name = "rollouts"
    verbose_name = "Configurations and rollouts"
    default_auto_field = "django.db.models.BigAutoField"
