from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fleet.models import Agent, AuditEvent, RemoteConfigState
from opamp.capabilities import agent_capability_names


class AgentSerializer(serializers.ModelSerializer):
    """An agent as the inventory knows it; every field is read-only (agents report them)."""

    status = serializers.CharField(read_only=True, help_text="online, unhealthy or offline")
    capability_names = serializers.SerializerMethodField()
    remote_config_state = serializers.SerializerMethodField()
    connection_settings_state = serializers.CharField(
        read_only=True, help_text="applied, applying, failed or unset, as the agent last reported; empty before"
    )

    class Meta:
        model = Agent
        fields = [
            "instance_uid",
            "status",
            "identifying_attributes",
            "non_identifying_attributes",
            "capabilities",
            "capability_names",
            "custom_capabilities",
            "healthy",
            "health",
            "effective_config",
            "effective_config_hash",
            "remote_config_hash",
            "remote_config_state",
            "remote_config_error",
            "package_statuses",
            "available_components",
            "available_components_hash",
            "connection_settings_status",
            "connection_settings_state",
            "transport",
            "remote_address",
            "last_sequence_num",
            "first_seen",
            "last_seen",
            "connected",
            "connected_at",
            "disconnected_at",
        ]
        read_only_fields = fields

    def get_capability_names(self, agent: Agent) -> list[str]:
        return agent_capability_names(agent.capabilities)

    def get_remote_config_state(self, agent: Agent) -> str:
        return RemoteConfigState(agent.remote_config_state).label

    def to_representation(self, instance: Agent) -> dict[str, Any]:
        data = super().to_representation(instance)
        # uint64 exceeds JSON's safe integer range; keep it exact as a string.
        data["last_sequence_num"] = str(instance.sequence_num)
        return data


class AgentSummarySerializer(AgentSerializer):
    """The list view leaves out the heavy documents (health tree, configs, components)."""

    class Meta(AgentSerializer.Meta):
        fields = [
            f
            for f in AgentSerializer.Meta.fields
            if f not in {"health", "effective_config", "available_components", "package_statuses"}
        ]
        read_only_fields = fields


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor.username", read_only=True, allow_null=True)
    details = serializers.JSONField(read_only=True)

    class Meta:
        model = AuditEvent
        fields = ["id", "at", "actor", "action", "target_type", "target_id", "details"]
        read_only_fields = fields
