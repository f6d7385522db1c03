"""The fleet inventory: one row per agent instance that ever spoke to the server."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from fleet.safe_text import safe_text

REMOTE_ADDRESS_MAX_CHARS = 64


def stored_remote_address(address: str) -> str:
    """An agent's address as its row holds it: capped to the column, NUL and lone
    surrogates replaced (fleet.safe_text). Every path that writes the column uses it: a
    full report, a held status and a reconnect's batched heartbeat."""
    return safe_text(address[:REMOTE_ADDRESS_MAX_CHARS])


def uint64_to_db(value: int) -> int:
    """The signed 64-bit integer with the same bits as unsigned `value`."""
    return value - (1 << 64) if value >= (1 << 63) else value


def uint64_from_db(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


class RemoteConfigState(models.IntegerChoices):
    """Mirrors RemoteConfigStatuses on the wire."""

    UNSET = 0, "unset"
    APPLIED = 1, "applied"
    APPLYING = 2, "applying"
    FAILED = 3, "failed"


class ConnectionSettingsState(models.IntegerChoices):
    """Mirrors ConnectionSettingsStatuses on the wire (the agent's connection_settings_status)."""

    UNSET = 0, "unset"
    APPLIED = 1, "applied"
    APPLYING = 2, "applying"
    FAILED = 3, "failed"


class Transport(models.TextChoices):
    WEBSOCKET = "websocket", "WebSocket"
    HTTP = "http", "HTTP"


class Agent(models.Model):
    """An agent instance, keyed by its OpAMP instance_uid.

    Reported sub-messages are stored as JSON documents already capped and made safe by
    `fleet.reports`; an absent sub-message in a report leaves its column unchanged.
    `last_seen` and `last_sequence_num` are written in batches (fleet.heartbeats), never
    once per heartbeat, so they may trail the live connection by one flush interval.
    """

    instance_uid = models.UUIDField(unique=True)
    identifying_attributes = models.JSONField(default=dict, blank=True)
    non_identifying_attributes = models.JSONField(default=dict, blank=True)
    # Only the capability bits defined by the protocol; undefined bits are dropped.
    # Reported attributes merged with operator labels (fleet.labels); what selectors match.
    labels = models.JSONField(default=dict, blank=True)
    # Labels an operator set; they win over reported attributes with the same key.
    operator_labels = models.JSONField(default=dict, blank=True)
    capabilities = models.BigIntegerField(default=0)
    custom_capabilities = models.JSONField(default=list, blank=True)

    healthy = models.BooleanField(null=True, blank=True)
    health = models.JSONField(null=True, blank=True)

    effective_config = models.JSONField(null=True, blank=True)
    effective_config_hash = models.CharField(max_length=64, blank=True)

    remote_config_hash = models.CharField(max_length=64, blank=True)
    remote_config_state = models.SmallIntegerField(choices=RemoteConfigState.choices, default=RemoteConfigState.UNSET)
    remote_config_error = models.TextField(blank=True)

    package_statuses = models.JSONField(null=True, blank=True)
    available_components = models.JSONField(null=True, blank=True)
    available_components_hash = models.CharField(max_length=64, blank=True)
    connection_settings_status = models.JSONField(null=True, blank=True)

    transport = models.CharField(max_length=16, choices=Transport.choices, blank=True)
    remote_address = models.CharField(max_length=REMOTE_ADDRESS_MAX_CHARS, blank=True)
    # uint64 on the wire, stored as the int64 with the same bits (see uint64_to_db): exact
    # on every database, where a decimal column loses precision on SQLite.
    last_sequence_num = models.BigIntegerField(default=0)
    # True once a full AgentDescription has been stored; False means ask for full state.
    description_received = models.BooleanField(default=False)
    # SHA-256 of the full report (description and every reported part) the row holds, or ""
    # once a partial report changed it: a reconnecting agent whose full report hashes the same
    # is admitted without reading, validating and saving its row (fleet.session). The
    # database default lets processes of the previous release insert rows during an upgrade.
    reported_state_hash = models.CharField(max_length=64, blank=True, default="", db_default="")

    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(db_index=True)
    connected = models.BooleanField(default=False, db_index=True)
    connected_at = models.DateTimeField(null=True, blank=True)
    disconnected_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-last_seen"]
        indexes = [
            models.Index(fields=["connected", "last_seen"], name="fleet_agent_presence_idx"),
            # The fleet page's keyset sorts (key, id) on these columns.
            models.Index(fields=["first_seen", "id"], name="fleet_agent_first_seen_idx"),
            models.Index(fields=["transport", "id"], name="fleet_agent_transport_idx"),
            models.Index(fields=["remote_config_state", "id"], name="fleet_agent_config_state_idx"),
        ]

    def __str__(self) -> str:
        name = self.identifying_attributes.get("service.name") if self.identifying_attributes else None
        return f"{name or 'agent'} {self.instance_uid}"

    @property
    def display_name(self) -> str:
        return str(self)

    @property
    def connection_settings_state(self) -> str:
        """The state of the connection settings the agent last reported ("" before any)."""
        status = self.connection_settings_status
        if not isinstance(status, dict):
            return ""
        value = status.get("status")
        return ConnectionSettingsState(value).label if value in ConnectionSettingsState.values else str(value)

    @property
    def sequence_num(self) -> int:
        """The last sequence number as the agent sent it (unsigned)."""
        return uint64_from_db(self.last_sequence_num)


class AuditEvent(models.Model):
    """Who changed what, when: one row per write made through the API or the admin."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=100)
    target_type = models.CharField(max_length=100)
    target_id = models.CharField(max_length=200)
    details = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        # The table keeps the name it was created with, when audit lived in rollouts.
        db_table = "rollouts_auditevent"
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target_type}:{self.target_id}"


class CommandKind(models.TextChoices):
    """ServerToAgentCommand types (the protocol defines only Restart)."""

    RESTART = "restart", "restart"


class AgentCommand(models.Model):
    """A command an operator asked for one agent (fleet.commands): delivered once, in a
    ServerToAgent of its own, then kept as the record of what was asked and when."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="commands")
    kind = models.CharField(max_length=16, choices=CommandKind.choices, default=CommandKind.RESTART)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField()
    # When a session handed it to the agent's connection; never set twice.
    delivered_at = models.DateTimeField(null=True, blank=True)
    # The agent as it was when asked: a later connection or start time shows it restarted.
    connected_at_before = models.DateTimeField(null=True, blank=True)
    started_at_before = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        indexes = [
            models.Index(fields=["agent", "requested_at"], name="fleet_command_agent_idx"),
            models.Index(
                fields=["agent"], condition=models.Q(delivered_at__isnull=True), name="fleet_command_pending_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.agent_id} at {self.requested_at:%Y-%m-%d %H:%M:%S}"


class AgentCustomMessage(models.Model):
    """A custom message an agent sent (fleet.custom_messages): a bounded history per agent."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="custom_messages")
    capability = models.CharField(max_length=256)
    type = models.CharField(max_length=256, blank=True)
    # At most OPAMP_CUSTOM_MESSAGE_MAX_BYTES of the data; `size` is what the agent sent.
    data = models.BinaryField(default=b"", blank=True)
    size = models.IntegerField(default=0)
    received_at = models.DateTimeField()

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["agent", "id"], name="fleet_custom_message_agent_idx")]

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


class QueuedCustomMessage(models.Model):
    """A custom message an operator sends an agent: queued, delivered once, then kept."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="queued_custom_messages")
    capability = models.CharField(max_length=256)
    type = models.CharField(max_length=256, blank=True)
    data = models.BinaryField(default=b"", blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(
                fields=["agent", "id"],
                condition=models.Q(delivered_at__isnull=True),
                name="fleet_custom_queue_pending_idx",
            ),
        ]


class TelemetryConnectionSettings(models.Model):
    """Connection settings an operator offers the agents its selector matches
    (fleet.connection_settings): where they send their own metrics, traces and logs, named
    other connections, a heartbeat interval. Per agent and field, the highest priority wins
    (ties: the name). The destinations are canonical documents (fleet.telemetry_settings)."""

    name = models.CharField(
        max_length=200,
        unique=True,
        validators=[
            RegexValidator(r"^[^/\s][^/]*$", "a name must not be empty, start with a space or contain '/'"),
        ],
    )
    description = models.TextField(blank=True)
    # Canonical dict form of a label selector (fleet.label_selectors).
    selector = models.JSONField(default=dict, blank=True)
    priority = models.IntegerField(default=0)
    own_metrics = models.JSONField(null=True, blank=True)
    own_traces = models.JSONField(null=True, blank=True)
    own_logs = models.JSONField(null=True, blank=True)
    other_connections = models.JSONField(default=dict, blank=True)
    heartbeat_interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "name"]
        verbose_name = "telemetry connection settings"
        verbose_name_plural = "telemetry connection settings"

    def __str__(self) -> str:
        return self.name


class TelemetrySettingsRevision(models.Model):
    """One row: a token replaced whenever what the settings resolve to may have changed (an
    entry written or deleted, an agent's labels changed while entries exist). Each server
    process reads it at most once a second and resolves its agents again when it moved."""

    token = models.CharField(max_length=32, default="")
    changed_at = models.DateTimeField(null=True, blank=True)
