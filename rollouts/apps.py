from __future__ import annotations

from django.apps import AppConfig


class RolloutsConfig(AppConfig):
    name = "rollouts"
    verbose_name = "Configurations and rollouts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from fleet import extensions
        from fleet.periodic import PeriodicTaskSpec, declare
        from rollouts.fleet_extension import PackagesFleetExtension, RolloutsFleetExtension

        extensions.register(RolloutsFleetExtension())
        extensions.register(PackagesFleetExtension())
        declare(
            PeriodicTaskSpec("rollouts: advance", "rollouts.tasks.advance_rollouts", "OPAMP_ROLLOUT_TICK_SECONDS"),
            PeriodicTaskSpec("rollouts: prune the desired-state log", "rollouts.tasks.prune_desired_state_log", 600),
            PeriodicTaskSpec(
                "rollouts: reconcile desired state", "rollouts.tasks.reconcile_desired_state", "OPAMP_RECONCILE_SECONDS"
            ),
        )
