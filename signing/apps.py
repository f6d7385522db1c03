from __future__ import annotations

from django.apps import AppConfig


class SigningConfig(AppConfig):
    name = "signing"
    verbose_name = "Signing and identity"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from fleet import extensions
        from fleet.periodic import PeriodicTaskSpec, declare
        from signing.fleet_extension import SigningFleetExtension

        extensions.register(SigningFleetExtension())
        # Hourly, against a nextUpdate of OPAMP_CRL_NEXT_UPDATE_HOURS (24 by default).
        declare(PeriodicTaskSpec("signing: refresh the CRL file", "signing.tasks.refresh_crl", 3600))
