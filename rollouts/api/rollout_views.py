"""The rollouts API: create (or dry-run), the verbs, status per stage, the event timeline."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from fleet.api.validation import validated
from fleet.errors import DomainError
from rollouts.api import rollout_serializers as rs
from rollouts.api.packages import package_or_404
from rollouts.api.views import RolloutsAPIMixin, configuration_or_404, version_or_400
from rollouts.models import ROLLOUT_SUBJECT_RELATIONS, Rollout, RolloutState
from rollouts.packages import package_version_named
from rollouts.rollout_services import answers, creation, verbs


def _stage_specs(stages: list[dict[str, Any]]) -> list[creation.StageSpec]:
    return [creation.StageSpec(**stage) for stage in stages]


def rollout_policy(data: dict[str, Any]) -> dict[str, Any]:
    """The gate's settings of a validated rollout body, as both kinds of rollout take them."""
    return {
        "max_failure_rate": data["max_failure_rate"],
        "apply_timeout_seconds": data["apply_timeout_seconds"],
        "min_reporting": data["min_reporting"],
        "auto_rollback": data["auto_rollback"],
        "salt": data.get("salt"),
        "note": data["note"],
    }


class RolloutViewSet(RolloutsAPIMixin, viewsets.GenericViewSet):
    """Timed canary rollouts of a configuration's candidate version or of a package version."""

    serializer_class = rs.RolloutSerializer
    # Ids are integers: anything else is no rollout (404), never a failed int() (a 500).
    lookup_value_regex = "[0-9]+"
    filterset_fields = ["state"]
    ordering_fields = ["created_at", "id"]
    ordering = ["-created_at", "-id"]

    def get_queryset(self) -> QuerySet[Rollout]:
        return Rollout.objects.select_related(*ROLLOUT_SUBJECT_RELATIONS, "created_by").prefetch_related(
            "stages__approved_by"
        )

    def _encode(self, rollout: Rollout, *, code: int = status.HTTP_200_OK) -> Response:
        rollout = self.get_queryset().get(pk=rollout.pk)
        context: dict[str, Any] = {"counts": answers.stage_counts(rollout)}
        if rollout.state in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
            context["rollback"] = answers.rollback_progress(rollout)
        return Response(rs.RolloutSerializer(rollout, context=context).data, status=code)

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(rs.RolloutSerializer(page, many=True, context={"counts": {}}).data)

    def retrieve(self, request: Request, pk: str) -> Response:
        return self._encode(self.get_object())

    @extend_schema(
        request=rs.RolloutInputSerializer,
        responses={201: rs.RolloutSerializer, 200: rs.DryRunSerializer},
        description="Create a draft rollout of a configuration's version or of a package's version (from the "
        "version its assignments give), or with dry_run=true show which agents each stage would take and "
        "the salt that drew them (create with that salt for the same cohorts).",
    )
    def create(self, request: Request) -> Response:
        data = validated(rs.RolloutInputSerializer, request.data)
        stages = _stage_specs(data["stages"])
        if "package" in data:
            return self._create_package_rollout(request, data, stages)
        configuration = configuration_or_404(data["configuration"])
        number = data["candidate_version"]
        if not isinstance(number, int):
            if not number.isdigit() or int(number) < 1:
                raise DomainError(rs.CANDIDATE_VERSION_INVALID, field="candidate_version")
            number = int(number)
        if data["dry_run"]:
            result = creation.rollout_dry_run(configuration=configuration, stages=stages, salt=data.get("salt"))
            return Response(rs.DryRunSerializer(result).data)
        rollout = creation.rollout_create(
            configuration=configuration,
            candidate=version_or_400(configuration, number, field="candidate_version"),
            stages=stages,
            actor=request.user,
            **rollout_policy(data),
        )
        return self._encode(rollout, code=status.HTTP_201_CREATED)

    def _create_package_rollout(
        self, request: Request, data: dict[str, Any], stages: list[creation.StageSpec]
    ) -> Response:
        package = package_or_404(data["package"])
        if data["dry_run"]:
            result = creation.rollout_dry_run(package=package, stages=stages, salt=data.get("salt"))
            return Response(rs.DryRunSerializer(result).data)
        candidate = package_version_named(package, str(data["candidate_version"]), field="candidate_version")
        rollout = creation.package_rollout_create(
            package=package,
            candidate=candidate,
            stages=stages,
            actor=request.user,
            **rollout_policy(data),
        )
        return self._encode(rollout, code=status.HTTP_201_CREATED)

    def _verb(self, request: Request, pk: str, verb: str) -> Response:
        rollout = get_object_or_404(Rollout, pk=pk)
        if not getattr(verbs, f"rollout_{verb}")(rollout=rollout, actor=request.user):
            raise DomainError(verbs.LOST_RACE.format(rollout_id=rollout.pk), status=409)
        return self._encode(rollout)

    @extend_schema(request=None, responses=rs.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        return self._verb(request, pk, "start")

    @extend_schema(request=None, responses=rs.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str) -> Response:
        return self._verb(request, pk, "pause")

    @extend_schema(request=None, responses=rs.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        return self._verb(request, pk, "resume")

    @extend_schema(request=None, responses=rs.RolloutSerializer, description="Skip to the last stage.")
    @action(detail=True, methods=["post"])
    def promote(self, request: Request, pk: str) -> Response:
        return self._verb(request, pk, "promote")

    @extend_schema(request=None, responses=rs.RolloutSerializer, description="Roll back (or cancel a draft).")
    @action(detail=True, methods=["post"])
    def abort(self, request: Request, pk: str) -> Response:
        return self._verb(request, pk, "abort")

    @extend_schema(request=None, responses=rs.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str) -> Response:
        return self._verb(request, pk, "retry")

    @extend_schema(request=rs.ApproveSerializer, responses=rs.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        data = validated(rs.ApproveSerializer, request.data)
        rollout = get_object_or_404(Rollout, pk=pk)
        verbs.rollout_approve_stage(rollout=rollout, stage_index=data["stage"], actor=request.user)
        return self._encode(rollout)

    @extend_schema(responses=rs.RolloutEventSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None, filter_backends=[])
    def events(self, request: Request, pk: str) -> Response:
        rollout = get_object_or_404(Rollout, pk=pk)
        return Response(rs.RolloutEventSerializer(rollout.events.select_related("actor"), many=True).data)
