"""Shapes of the rollouts API: input validation only; no side effects live here."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fleet.api.validation import StrictSerializer
from rollouts.models import Rollout, RolloutEvent, RolloutStage
from rollouts.rollout_services.gate import gate_stale


class StageInputSerializer(StrictSerializer):
    percent = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=100)
    count = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    selector = serializers.JSONField(required=False, allow_null=True, help_text="dict or short string form")
    hold_seconds = serializers.FloatField(default=0, min_value=0)
    requires_approval = serializers.BooleanField(default=False)


CANDIDATE_VERSION_INVALID = "a configuration's version number (>= 1), or a package's version name"
ONE_SUBJECT = "give exactly one of configuration or package"


@extend_schema_field({"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "maxLength": 200}]})
class CandidateVersionField(serializers.Field):
    """A configuration's version number or a package's version name."""

    default_error_messages = {"invalid": CANDIDATE_VERSION_INVALID}

    def to_internal_value(self, data: Any) -> int | str:
        if isinstance(data, bool):
            self.fail("invalid")
        if isinstance(data, int):
            if data < 1:
                self.fail("invalid")
            return data
        if isinstance(data, str) and data.strip() and len(data) <= 200:
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


class RolloutInputSerializer(StrictSerializer):
    configuration = serializers.CharField(required=False, help_text="configuration name (a configuration rollout)")
    package = serializers.CharField(required=False, help_text="package name (a package rollout)")
    candidate_version = CandidateVersionField(
        help_text="a configuration's version number, or the package version to roll out"
    )
    stages = StageInputSerializer(many=True)
    max_failure_rate = serializers.FloatField(default=0.001, min_value=0, max_value=1)
    apply_timeout_seconds = serializers.FloatField(default=300, min_value=1)
    min_reporting = serializers.IntegerField(default=1, min_value=1)
    auto_rollback = serializers.BooleanField(default=True)
    salt = serializers.CharField(required=False, allow_blank=False, max_length=64)
    note = serializers.CharField(default="", allow_blank=True)
    dry_run = serializers.BooleanField(default=False, help_text="show each stage's agents; create nothing")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("configuration" in attrs) == ("package" in attrs):
            raise serializers.ValidationError(ONE_SUBJECT)
        return attrs


class ApproveSerializer(serializers.Serializer):
    stage = serializers.IntegerField(min_value=0)


class StageSerializer(serializers.ModelSerializer):
    approved_by = serializers.CharField(source="approved_by.username", read_only=True, allow_null=True)
    counts = serializers.SerializerMethodField()

    class Meta:
        model = RolloutStage
        fields = [
            "index",
            "percent",
            "count",
            "selector",
            "hold_seconds",
            "requires_approval",
            "approved_by",
            "approved_at",
            "bucket_threshold",
            "counts",
        ]
        read_only_fields = fields

    def get_counts(self, stage: RolloutStage) -> dict[str, Any] | None:
        counts = self.context.get("counts", {}).get(stage.index)
        return counts.as_dict() if counts is not None else None


class RolloutSerializer(serializers.ModelSerializer):
    """A configuration rollout names its configuration and version numbers; a package
    rollout its package and version names (`configuration` and the hashes are null)."""

    kind = serializers.SerializerMethodField()
    configuration = serializers.CharField(source="configuration.name", read_only=True, allow_null=True, default=None)
    package = serializers.CharField(source="package.name", read_only=True, allow_null=True, default=None)
    stable_version = serializers.SerializerMethodField()
    candidate_version = serializers.SerializerMethodField()
    stable_hash = serializers.CharField(
        source="stable_version.config_hash", read_only=True, allow_null=True, default=None
    )
    candidate_hash = serializers.CharField(
        source="candidate_version.config_hash", read_only=True, allow_null=True, default=None
    )
    created_by = serializers.CharField(source="created_by.username", read_only=True, allow_null=True)
    stages = serializers.SerializerMethodField()
    rollback = serializers.SerializerMethodField()
    gate_stale = serializers.SerializerMethodField(
        help_text="running or rolling back, and the gate has not checked it for a few tick intervals"
    )

    class Meta:
        model = Rollout
        fields = [
            "id",
            "kind",
            "configuration",
            "package",
            "state",
            "stage_index",
            "stage_started_at",
            "gate_checked_at",
            "gate_stale",
            "stable_version",
            "candidate_version",
            "stable_hash",
            "candidate_hash",
            "max_failure_rate",
            "apply_timeout_seconds",
            "min_reporting",
            "auto_rollback",
            "salt",
            "note",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "stages",
            "rollback",
        ]
        read_only_fields = fields

    def get_kind(self, rollout: Rollout) -> str:
        return "package" if rollout.is_package else "configuration"

    def get_stable_version(self, rollout: Rollout) -> int | str | None:
        if rollout.is_package:
            return rollout.stable_package_version.version if rollout.stable_package_version else None
        return rollout.stable_version.number if rollout.stable_version else None

    def get_candidate_version(self, rollout: Rollout) -> int | str | None:
        if rollout.is_package:
            return rollout.candidate_package_version.version if rollout.candidate_package_version else None
        return rollout.candidate_version.number if rollout.candidate_version else None

    def get_stages(self, rollout: Rollout) -> list[dict[str, Any]]:
        return list(StageSerializer(rollout.stages.all(), many=True, context=self.context).data)

    def get_gate_stale(self, rollout: Rollout) -> bool:
        return gate_stale(rollout)

    def get_rollback(self, rollout: Rollout) -> dict[str, int] | None:
        return self.context.get("rollback")


class RolloutEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor.username", read_only=True, allow_null=True)

    class Meta:
        model = RolloutEvent
        fields = ["kind", "from_state", "to_state", "stage_index", "actor", "message", "counts", "at"]
        read_only_fields = fields


class DryRunStageSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    percent = serializers.FloatField(allow_null=True)
    count = serializers.IntegerField(allow_null=True)
    cohort_size = serializers.IntegerField()
    cumulative = serializers.IntegerField()
    sample = serializers.ListField(child=serializers.CharField())


class DryRunSerializer(serializers.Serializer):
    salt = serializers.CharField(help_text="create the rollout with this salt to get these cohorts")
    stages = DryRunStageSerializer(many=True)
