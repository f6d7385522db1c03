"""Request and answer shapes of the telemetry connection settings API."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fleet.api.validation import StrictSerializer
from fleet.models import TelemetryConnectionSettings
from fleet.telemetry_settings import MAX_HEARTBEAT_SECONDS, MIN_HEARTBEAT_SECONDS, OWN_FIELDS, redacted

DESTINATION_SCHEMA = {
    "type": "object",
    "nullable": True,
    "description": (
        "destination_endpoint (an http(s) URL), headers (name -> value), tls (ca_pem, "
        "insecure_skip_verify, include_system_ca_certs_pool); null clears it"
    ),
}


@extend_schema_field(DESTINATION_SCHEMA)
class DestinationField(serializers.Field):
    """A destination document, passed on unchecked: the service names every problem."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_null=True, required=False, **kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise serializers.ValidationError("expected an object or null")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(
    {
        "oneOf": [{"type": "object"}, {"type": "string"}],
        "nullable": True,
        "description": 'a label selector ("env=prod,tier in (web)" or the dict form); null or empty: every agent',
    }
)
class SettingsSelectorField(serializers.Field):
    """A selector in either form, passed on unparsed (the service's parse names the problem);
    unlike an action's, an empty one is allowed: settings for every agent."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_null=True, required=False, **kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict | str):
            raise serializers.ValidationError("expected a selector string or object")
        return data

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is None:
            return True, {}
        return super().validate_empty_values(data)


@extend_schema_field({"type": "object", "description": "connection name -> destination (plus other_settings)"})
class OtherConnectionsField(DestinationField):
    pass


class TelemetrySettingsInputSerializer(StrictSerializer):
    name = serializers.RegexField(r"^[^/\s][^/]*$", max_length=200)
    description = serializers.CharField(allow_blank=True, required=False)
    selector = SettingsSelectorField(default=dict, help_text="the agents these settings are for")
    priority = serializers.IntegerField(required=False, min_value=-(2**31), max_value=2**31 - 1)
    own_metrics = DestinationField()
    own_traces = DestinationField()
    own_logs = DestinationField()
    other_connections = OtherConnectionsField()
    heartbeat_interval_seconds = serializers.IntegerField(
        allow_null=True, required=False, min_value=MIN_HEARTBEAT_SECONDS, max_value=MAX_HEARTBEAT_SECONDS
    )


class TelemetrySettingsSerializer(serializers.ModelSerializer):
    """An entry; header values only for operators (`context["reveal"]`), "(hidden)" otherwise."""

    own_metrics = DestinationField(read_only=True)
    own_traces = DestinationField(read_only=True)
    own_logs = DestinationField(read_only=True)
    other_connections = OtherConnectionsField(read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    def to_representation(self, instance: TelemetryConnectionSettings) -> dict[str, Any]:
        data = super().to_representation(instance)
        if not self.context.get("reveal"):
            for name in OWN_FIELDS:
                data[name] = redacted(data[name])
            data["other_connections"] = {
                name: redacted(document) for name, document in (data["other_connections"] or {}).items()
            }
        return data

    class Meta:
        model = TelemetryConnectionSettings
        fields = [
            "name",
            "description",
            "selector",
            "priority",
            "own_metrics",
            "own_traces",
            "own_logs",
            "other_connections",
            "heartbeat_interval_seconds",
            "created_by",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields
