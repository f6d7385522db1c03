"""Shapes of the configurations API. Input serializers check shape only (types, required
keys); what the content means (a valid selector, valid files, free names) is decided by
the services. Output serializers encode what selectors return; none of them writes."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fleet.api.serializers import AgentSummarySerializer
from fleet.api.validation import LabelsField
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import Operator
from rollouts.models import Configuration, ConfigVersion, ReconcilerState

SELECTOR_EXAMPLE = "env=prod,tier in (edge,core),!legacy"
SELECTOR_TYPE = "a selector is an object (matchLabels, matchExpressions) or a string such as " + repr(SELECTOR_EXAMPLE)
# Names appear as one URL path segment (configurations/{name}/), so no slash.
CONFIGURATION_NAME_REGEX = r"^[^/\s][^/]*$"
CONFIGURATION_NAME_INVALID = "a configuration name must not be empty, start with a space or contain '/'"


class RequirementSerializer(serializers.Serializer):
    key = serializers.CharField()
    operator = serializers.ChoiceField(choices=[operator.value for operator in Operator])
    values = serializers.ListField(child=serializers.CharField(), required=False)


class LabelSelectorSerializer(serializers.Serializer):
    """The canonical dict form of a selector; empty parts are left out."""

    matchLabels = serializers.DictField(child=serializers.CharField(), required=False)
    matchExpressions = RequirementSerializer(many=True, required=False)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "object", "description": "the dict form: matchLabels and matchExpressions"},
            {"type": "string", "example": SELECTOR_EXAMPLE},
        ],
        "nullable": True,
        "description": "Kubernetes label selector semantics; null or empty matches every agent",
    }
)
class SelectorField(serializers.Field):
    """A selector in either form, passed on unparsed; null means the empty selector."""

    default_error_messages = {"type": SELECTOR_TYPE}

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is None:
            return True, {}
        return super().validate_empty_values(data)

    def to_internal_value(self, data: Any) -> dict[str, Any] | str:
        if not isinstance(data, dict | str):
            self.fail("type")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class ConfigFileSerializer(serializers.Serializer):
    body = serializers.CharField(allow_blank=True, trim_whitespace=False)
    content_type = serializers.CharField(help_text="text/yaml, application/json or text/plain (and their aliases)")


@extend_schema_field(serializers.DictField(child=ConfigFileSerializer()))
class ConfigFilesField(serializers.JSONField):
    """{file name: {body, content_type}}, passed on as sent: the service validates every file
    and reports all problems at once."""


@extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
# Configurations


class ConfigurationInputSerializer(serializers.Serializer):
    """Create and PUT take every field (omitted ones get their defaults); PATCH any subset."""

    name = serializers.RegexField(
        CONFIGURATION_NAME_REGEX, max_length=200, error_messages={"invalid": CONFIGURATION_NAME_INVALID}
    )
    selector = SelectorField(default=dict)
    priority = serializers.IntegerField(default=0, min_value=-(2**31), max_value=2**31 - 1)
    description = serializers.CharField(default="", allow_blank=True)


class VersionRefSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    config_hash = serializers.CharField()


class ConfigurationSerializer(serializers.ModelSerializer):
    selector = LabelSelectorSerializer(read_only=True)
    selector_string = serializers.SerializerMethodField()
    current_version = VersionRefSerializer(read_only=True, allow_null=True)
    agent_count = serializers.IntegerField(read_only=True, help_text="agents whose desired config comes from here")

    class Meta:
        model = Configuration
        fields = [
            "name",
            "description",
            "selector",
            "selector_string",
            "priority",
            "current_version",
            "agent_count",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_selector_string(self, configuration: Configuration) -> str:
        return parse_selector(configuration.selector).to_string()


# Versions


class PublishSerializer(serializers.Serializer):
    files = ConfigFilesField()
    note = serializers.CharField(default="", allow_blank=True)
    activate = serializers.BooleanField(
        default=True,
        help_text="false stores the version as a rollout candidate without delivering it",
    )


class RollbackSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, help_text="the number of the version whose content to restore")
    note = serializers.CharField(default="", allow_blank=True)


class ConfigVersionSerializer(serializers.ModelSerializer):
    configuration = serializers.CharField(source="configuration.name", read_only=True)
    author = serializers.CharField(source="author.username", read_only=True, allow_null=True)
    rolled_back_from = serializers.IntegerField(source="rolled_back_from.number", read_only=True, allow_null=True)

    class Meta:
        model = ConfigVersion
        fields = [
            "configuration",
            "number",
            "config_hash",
            "author",
            "created_at",
            "note",
            "rolled_back_from",
            "size_bytes",
        ]
        read_only_fields = fields


class ConfigVersionDetailSerializer(ConfigVersionSerializer):
    files = serializers.DictField(child=ConfigFileSerializer(), read_only=True)

    class Meta(ConfigVersionSerializer.Meta):
        fields = [*ConfigVersionSerializer.Meta.fields, "files"]
        read_only_fields = fields


class VersionStatusSerializer(serializers.Serializer):
    total = serializers.IntegerField(help_text="agents whose desired version this is")
    applied = serializers.IntegerField()
    applying = serializers.IntegerField()
    failed = serializers.IntegerField()
    pending = serializers.IntegerField(help_text="online, not yet reporting this version")
    offline = serializers.IntegerField(help_text="offline, not yet reporting this version")


class _FromToSerializer(serializers.Serializer):
    """`from` is a Python keyword: declared as `from_`, exposed as `from`."""

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        return {("from" if name == "from_" else name): field for name, field in fields.items()}


class DiffQuerySerializer(_FromToSerializer):
    from_ = serializers.IntegerField(min_value=1, help_text="the older version number")
    to = serializers.IntegerField(min_value=1, help_text="the newer version number")


class VersionDiffSerializer(_FromToSerializer):
    from_ = serializers.IntegerField()
    to = serializers.IntegerField()
    files = serializers.DictField(
        child=serializers.CharField(), help_text="unified diff per changed file; unchanged files are left out"
    )


# Selectors, agents, audit


class SelectorPreviewInputSerializer(serializers.Serializer):
    selector = SelectorField()


class SelectorPreviewSerializer(serializers.Serializer):
    selector = LabelSelectorSerializer()
    selector_string = serializers.CharField()
    count = serializers.IntegerField()
    by_status = serializers.DictField(child=serializers.IntegerField(), help_text="online / unhealthy / offline")
    agents = AgentSummarySerializer(many=True, help_text="the first 100, most recently seen first")


class AgentLabelsInputSerializer(serializers.Serializer):
    labels = LabelsField()


class AgentLabelsSerializer(serializers.Serializer):
    operator_labels = serializers.DictField(child=serializers.CharField(), help_text="set by operators")
    labels = serializers.DictField(
        child=serializers.CharField(), help_text="reported attributes overlaid by operator labels: what selectors match"
    )


class AgentConfigStateSerializer(serializers.Serializer):
    configuration = serializers.CharField(allow_null=True)
    desired_version = serializers.IntegerField(allow_null=True)
    desired_hash = serializers.CharField()
    reported_hash = serializers.CharField()
    state = serializers.ChoiceField(choices=["applied", "applying", "failed", "pending", "none"])
    error = serializers.CharField()
    effective_hash = serializers.CharField()
    drift = serializers.BooleanField()
    summary = serializers.CharField()


class ReconcilerStateSerializer(serializers.ModelSerializer):
    """What the desired-state reconciler has checked and repaired; repairs should stay 0."""

    class Meta:
        model = ReconcilerState
        fields = list(ReconcilerState.SHOWN_FIELDS)
        read_only_fields = fields
