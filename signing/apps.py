from __future__ import annotations

from django.apps import AppConfig


class SigningConfig(AppConfig):
    name = "signing"
    verbose_name = "Signing and identity"
    default_auto_field = "django.db.models.BigAutoField"
