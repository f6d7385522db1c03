"""Request and answer shapes of the commands and custom messages API."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fleet.api.validation import StrictSerializer
from fleet.commands import command_delivery
from fleet.custom_messages import NAME_MAX_CHARS, custom_message_delivery
from fleet.models import AgentCommand, AgentCustomMessage, QueuedCustomMessage
from fleet.pending_deliveries import DELIVERY_STATE_CHOICES, Delivery

STATE_HELP = "pending (waiting for the agent), delivered, or expired (not delivered within its time to live)"

SELECTOR_HELP = 'a label selector: the short string form ("env=prod,tier in (web)") or the dict form'


@extend_schema_field({"oneOf": [{"type": "object"}, {"type": "string"}], "description": SELECTOR_HELP})
class SelectorInputField(serializers.Field):
    """A selector in either form, passed on unparsed (the service's parse names the problem)."""

    default_error_messages = {"type": "expected a selector string or object", "empty": "must not be empty"}

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict | str):
            self.fail("type")
        if not data or (isinstance(data, str) and not data.strip()):
            # An empty selector picks every agent: asked for explicitly, never by omission.
            self.fail("empty")
        return data


class Base64Field(serializers.CharField):
    """Bytes as standard base64 text, at most OPAMP_CUSTOM_MESSAGE_MAX_BYTES decoded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_blank=True, trim_whitespace=False, **kwargs)

    def to_internal_value(self, data: Any) -> bytes:  # type: ignore[override]
        text = super().to_internal_value(data)
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise serializers.ValidationError("not base64") from None
        if len(decoded) > settings.OPAMP_CUSTOM_MESSAGE_MAX_BYTES:
            raise serializers.ValidationError(f"over {settings.OPAMP_CUSTOM_MESSAGE_MAX_BYTES} bytes")
        return decoded

    def to_representation(self, value: Any) -> str:
        return base64.b64encode(bytes(value)).decode("ascii")


class DeliveryStateMixin(serializers.Serializer):
    """A queued row's state and when it expires, by its kind's delivery rule."""

    state = serializers.SerializerMethodField(help_text=STATE_HELP)
    expires_at = serializers.SerializerMethodField(help_text="when it expires unless delivered before")

    def delivery(self) -> Delivery:
        raise NotImplementedError

    @extend_schema_field(serializers.ChoiceField(choices=DELIVERY_STATE_CHOICES))
    def get_state(self, row: Any) -> str:
        return self.delivery().state(requested_at=row.requested_at, delivered_at=row.delivered_at).value

    @extend_schema_field(serializers.DateTimeField())
    def get_expires_at(self, row: Any) -> str:
        return serializers.DateTimeField().to_representation(self.delivery().expires_at(row.requested_at))


class RestartInputSerializer(StrictSerializer):
    """Nothing to give: the agent is in the URL."""


class SelectorRestartInputSerializer(StrictSerializer):
    selector = SelectorInputField()


class CustomMessageInputSerializer(StrictSerializer):
    capability = serializers.CharField(max_length=NAME_MAX_CHARS, help_text="a custom capability the agent declared")
    type = serializers.CharField(max_length=NAME_MAX_CHARS, allow_blank=True, default="")
    data = Base64Field(required=False, help_text="the message's bytes, base64 (none when left out)")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs.setdefault("data", b"")
        return attrs


class SelectorCustomMessageInputSerializer(CustomMessageInputSerializer):
    selector = SelectorInputField()


class CommandSerializer(DeliveryStateMixin, serializers.ModelSerializer):
    """A command with what became of it: delivered when (or expired), and whether the agent
    came back since."""

    instance_uid = serializers.UUIDField(source="agent.instance_uid", read_only=True)
    requested_by = serializers.CharField(source="requested_by.username", read_only=True, allow_null=True)
    reconnected_since = serializers.SerializerMethodField(
        help_text="the agent opened a new connection after the command was delivered"
    )
    reported_since = serializers.SerializerMethodField(help_text="the agent was heard from after the delivery")

    class Meta:
        model = AgentCommand
        fields = [
            "id",
            "instance_uid",
            "kind",
            "requested_by",
            "requested_at",
            "delivered_at",
            "state",
            "expires_at",
            "connected_at_before",
            "started_at_before",
            "reconnected_since",
            "reported_since",
        ]
        read_only_fields = fields

    def delivery(self) -> Delivery:
        return command_delivery()

    def get_reconnected_since(self, command: AgentCommand) -> bool:
        connected_at = command.agent.connected_at
        return bool(command.delivered_at and connected_at and connected_at > command.delivered_at)

    def get_reported_since(self, command: AgentCommand) -> bool:
        return bool(command.delivered_at and command.agent.last_seen > command.delivered_at)


class AgentCustomMessageSerializer(serializers.ModelSerializer):
    data = Base64Field(read_only=True)
    truncated = serializers.BooleanField(read_only=True)

    class Meta:
        model = AgentCustomMessage
        fields = ["id", "capability", "type", "data", "size", "truncated", "received_at"]
        read_only_fields = fields


class QueuedCustomMessageSerializer(DeliveryStateMixin, serializers.ModelSerializer):
    instance_uid = serializers.UUIDField(source="agent.instance_uid", read_only=True)
    requested_by = serializers.CharField(source="requested_by.username", read_only=True, allow_null=True)
    data = Base64Field(read_only=True)

    class Meta:
        model = QueuedCustomMessage
        fields = [
            "id",
            "instance_uid",
            "capability",
            "type",
            "data",
            "requested_by",
            "requested_at",
            "delivered_at",
            "state",
            "expires_at",
        ]
        read_only_fields = fields

    def delivery(self) -> Delivery:
        return custom_message_delivery()


class RestartOutcomeSerializer(serializers.Serializer):
    requested = serializers.IntegerField()
    not_capable = serializers.IntegerField(help_text="agents that do not declare AcceptsRestartCommand")
    rate_limited = serializers.IntegerField(
        help_text="agents with a restart waiting, or asked within OPAMP_RESTART_MIN_INTERVAL_SECONDS"
    )
    detail = serializers.CharField()
    commands = CommandSerializer(many=True)


class SendOutcomeSerializer(serializers.Serializer):
    queued = serializers.IntegerField()
    not_capable = serializers.IntegerField(help_text="agents that did not declare the capability")
    queue_full = serializers.IntegerField(help_text="agents with OPAMP_CUSTOM_MESSAGE_QUEUE messages waiting")
    detail = serializers.CharField()
    messages = QueuedCustomMessageSerializer(many=True)
