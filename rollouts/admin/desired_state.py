"""Read-only admins of what the resolver and the reconciler write: agents' assignments and
the reconciler's counters.
"""

from __future__ import annotations

from django.contrib import admin

from fleet.admin_base import ReadOnlyRoleAdminMixin
from rollouts.models import AgentDesiredConfig, ReconcilerState


@admin.register(AgentDesiredConfig)
class AgentDesiredConfigAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["agent", "configuration", "version", "offered_hash", "offered_at", "updated_at"]
    list_filter = ["configuration"]
    list_select_related = ["agent", "configuration", "version__configuration"]
    search_fields = ["agent__instance_uid", "configuration__name"]


@admin.register(ReconcilerState)
class ReconcilerStateAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    """The reconciler's counters: a non-zero repair count means assignments went wrong."""

    list_display = [
        "__str__",
        "last_run_at",
        "last_run_checked",
        "last_run_repaired",
        "repairs_total",
        "last_repair_at",
    ]
    fields = list(ReconcilerState.SHOWN_FIELDS)
    readonly_fields = fields
