"""Read-only admin for the inventory: agents report their state, operators look at it.

Telemetry connection settings have their admin in fleet.telemetry_settings_admin (imported
here so that the admin site finds it)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from fleet import selectors, telemetry_settings_admin  # noqa: F401 - registers its admin
from fleet.admin_base import ReadOnlyRoleAdminMixin, pretty_json
from fleet.commands import command_delivery, command_list, restart_request
from fleet.custom_messages import custom_message_delivery, queued_custom_messages
from fleet.models import Agent, AgentCommand, AuditEvent, QueuedCustomMessage, RemoteConfigState
from fleet.pending_deliveries import DELIVERY_STATE_CHOICES, Delivery, DeliveryState
from fleet.roles import can_write
from opamp.capabilities import AgentCapabilities, agent_capability_names


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(selectors.AgentStatus.CHOICES)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Agent]) -> QuerySet[Agent]:
        if self.value() in dict(selectors.AgentStatus.CHOICES):
            return queryset.filter(selectors.status_q(str(self.value())))
        return queryset


class CapabilityFilter(admin.SimpleListFilter):
    title = "capability"
    parameter_name = "capability"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            (member.name.lower(), member.name.lower().replace("_", " ")) for member in AgentCapabilities if member.name
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Agent]) -> QuerySet[Agent]:
        if self.value():
            try:
                return selectors.with_capability(queryset, str(self.value()))
            except ValueError:
                return queryset.none()
        return queryset


def attribute_filter(key: str) -> type[admin.SimpleListFilter]:
    """A list filter over the distinct values of one reported attribute."""

    class AttributeFilter(admin.SimpleListFilter):
        title = key
        parameter_name = "attr_" + key.replace(".", "_")

        def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
            return [(value, value) for value in selectors.attribute_values(key)]

        def queryset(self, request: HttpRequest, queryset: QuerySet[Agent]) -> QuerySet[Agent]:
            if self.value():
                return selectors.with_attribute(queryset, key, str(self.value()))
            return queryset

    AttributeFilter.__name__ = f"AttributeFilter_{key.replace('.', '_')}"
    return AttributeFilter


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["display_name", "instance_uid", "status", "transport", "remote_config", "last_seen"]
    list_filter = [
        StatusFilter,
        CapabilityFilter,
        attribute_filter("service.name"),
        attribute_filter("os.type"),
        "transport",
    ]
    search_fields = ["instance_uid", "remote_address"]
    ordering = ["-last_seen"]
    actions = ["restart_agents"]
    fieldsets = [
        (
            "Identity",
            {"fields": ["instance_uid", "identifying", "non_identifying", "capability_list", "custom_capabilities"]},
        ),
        (
            "Connection",
            {
                "fields": [
                    "status",
                    "transport",
                    "remote_address",
                    "connected",
                    "first_seen",
                    "last_seen",
                    "connected_at",
                    "disconnected_at",
                    "sequence_num",
                ]
            },
        ),
        ("Health", {"fields": ["healthy", "health_tree"]}),
        (
            "Configuration",
            {"fields": ["remote_config", "remote_config_error", "effective_config_hash", "effective_config_files"]},
        ),
        ("Packages and components", {"fields": ["packages", "components"]}),
        ("Connection settings", {"fields": ["connection_settings"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Agent]:
        return selectors.agent_list()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Agent | None = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return can_write(request.user)

    @admin.action(description="Restart the selected agents", permissions=["operate"])
    def restart_agents(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        """fleet.commands: only agents that accept restarts, not again within the minimum interval."""
        outcome = restart_request(agents=queryset, actor=request.user)
        self.message_user(request, f"{len(outcome.requested)} restart(s) requested.", messages.SUCCESS)
        if outcome.not_capable:
            self.message_user(
                request, f"{len(outcome.not_capable)} agent(s) do not accept restart commands.", messages.WARNING
            )
        if outcome.rate_limited:
            self.message_user(
                request,
                f"{len(outcome.rate_limited)} agent(s) skipped: a restart is pending or was requested recently.",
                messages.WARNING,
            )

    def get_readonly_fields(self, request: HttpRequest, obj: Agent | None = None) -> list[str]:
        return [field for _, options in self.fieldsets for field in options["fields"]]

    @admin.display(description="status")
    def status(self, agent: Agent) -> str:
        return str(getattr(agent, "status", ""))

    @admin.display(description="remote config")
    def remote_config(self, agent: Agent) -> str:
        state = RemoteConfigState(agent.remote_config_state).label
        return f"{state} {agent.remote_config_hash[:12]}" if agent.remote_config_hash else state

    @admin.display(description="identifying attributes")
    def identifying(self, agent: Agent) -> str:
        return pretty_json(agent.identifying_attributes)

    @admin.display(description="non-identifying attributes")
    def non_identifying(self, agent: Agent) -> str:
        return pretty_json(agent.non_identifying_attributes)

    @admin.display(description="capabilities")
    def capability_list(self, agent: Agent) -> str:
        return ", ".join(agent_capability_names(agent.capabilities)) or "—"

    @admin.display(description="health tree")
    def health_tree(self, agent: Agent) -> str:
        return pretty_json(agent.health)

    @admin.display(description="effective config")
    def effective_config_files(self, agent: Agent) -> str:
        return pretty_json(agent.effective_config)

    @admin.display(description="package statuses")
    def packages(self, agent: Agent) -> str:
        return pretty_json(agent.package_statuses)

    @admin.display(description="connection settings status")
    def connection_settings(self, agent: Agent) -> str:
        return pretty_json(agent.connection_settings_status)

    @admin.display(description="available components")
    def components(self, agent: Agent) -> str:
        return pretty_json(agent.available_components)


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["at", "actor", "action", "target_type", "target_id"]
    list_filter = ["action", "target_type", "actor"]
    search_fields = ["target_id", "actor__username"]
    date_hierarchy = "at"
    fields = ["at", "actor", "action", "target_type", "target_id", "details_display"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEvent]:
        return selectors.audit_list()

    @admin.display(description="details")
    def details_display(self, event: AuditEvent) -> str:
        return pretty_json(event.details)


def delivery_state_filter(delivery: Any) -> type[admin.SimpleListFilter]:
    """Pending, delivered or expired: conditions on the request time (`delivery()` gives the
    rule of the rows' kind), since expiry is derived, not stored."""

    class DeliveryStateFilter(admin.SimpleListFilter):
        title = "state"
        parameter_name = "state"

        def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
            return list(DELIVERY_STATE_CHOICES)

        def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
            if self.value() in {value for value, _ in DELIVERY_STATE_CHOICES}:
                rule: Delivery = delivery()
                return queryset.filter(rule.state_q(DeliveryState(self.value())))
            return queryset

    return DeliveryStateFilter


@admin.register(AgentCommand)
class AgentCommandAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    """Restarts asked (fleet.commands): who asked, and whether it was delivered or expired."""

    list_display = ["requested_at", "agent", "kind", "requested_by", "state", "delivered_at"]
    list_filter = [delivery_state_filter(command_delivery), "kind"]
    search_fields = ["agent__instance_uid", "requested_by__username"]
    list_select_related = ["agent", "requested_by"]
    fields = ["agent", "kind", "requested_by", "requested_at", "state", "delivered_at", "connected_at_before"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[AgentCommand]:
        return command_list()

    @admin.display(description="state")
    def state(self, command: AgentCommand) -> str:
        return str(getattr(command, "delivery_state", ""))


@admin.register(QueuedCustomMessage)
class QueuedCustomMessageAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    """Operators' custom messages (fleet.custom_messages): delivered once, or expired."""

    list_display = ["requested_at", "agent", "capability", "type", "requested_by", "state", "delivered_at"]
    list_filter = [delivery_state_filter(custom_message_delivery), "capability"]
    search_fields = ["agent__instance_uid", "capability", "type"]
    list_select_related = ["agent", "requested_by"]
    fields = ["agent", "capability", "type", "requested_by", "requested_at", "state", "delivered_at"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[QueuedCustomMessage]:
        return queued_custom_messages()

    @admin.display(description="state")
    def state(self, message: QueuedCustomMessage) -> str:
        return str(getattr(message, "delivery_state", ""))
