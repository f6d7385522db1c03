from __future__ import annotations

from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "fleet"
    verbose_name = "Fleet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        from fleet import extensions
        from fleet.fleet_extension import CommandsExtension, CustomMessagesExtension, TelemetrySettingsExtension
        from fleet.periodic import PeriodicTaskSpec, declare
        from opamp.runtime import require_upb

        if settings.OPAMP_REQUIRE_UPB:
            require_upb()
        extensions.register(CommandsExtension())
        extensions.register(CustomMessagesExtension())
        extensions.register(TelemetrySettingsExtension())
        declare(PeriodicTaskSpec("fleet: sweep stale connections", "fleet.tasks.sweep_stale_connections", 30))
