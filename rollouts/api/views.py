"""The configurations API. Each handler decodes its input with a serializer, makes one
service or selector call, and encodes the result; errors are answered centrally by
`fleet.api.exceptions`."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from fleet import agent_labels
from fleet import selectors as fleet_selectors
from fleet.api.permissions import RolePermission
from fleet.api.strict_input import JSONParser
from fleet.api.validation import validated
from fleet.errors import DomainError
from fleet.models import Agent
from rollouts import reconciler, selectors, services
from rollouts.api import serializers as s
from rollouts.errors import NO_SUCH_VERSION
from rollouts.models import Configuration, ConfigVersion

PREVIEW_LIMIT = 100


def configuration_or_404(name: str) -> Configuration:
    return get_object_or_404(selectors.configuration_list(), name=name)


def version_or_400(configuration: Configuration, number: int, *, field: str) -> ConfigVersion:
    """A version of `configuration` named in the request body or query: unknown is a 400."""
    version = selectors.version_list(configuration).filter(number=number).first()
    if version is None:
        raise DomainError(NO_SUCH_VERSION.format(name=configuration.name, number=number), field=field)
    return version


class RolloutsAPIMixin:
    """What every view here shares: the role rules, and JSON bodies only (selectors and
    config maps are nested documents that form encodings cannot carry)."""

    permission_classes = [RolePermission]
    parser_classes = [JSONParser]


class ConfigurationViewSet(RolloutsAPIMixin, viewsets.GenericViewSet):
    """Configurations by name: their selector, priority and current version."""

    serializer_class = s.ConfigurationSerializer
    lookup_field = "name"
    lookup_value_regex = "[^/]+"
    ordering_fields = ["name", "priority", "created_at", "updated_at"]
    ordering = ["-priority", "name"]

    def get_queryset(self) -> QuerySet[Configuration]:
        return selectors.configuration_list()

    def _encode(self, configuration: Configuration, *, code: int = status.HTTP_200_OK) -> Response:
        # Re-read through the selector: the response carries its annotations (agent_count).
        fresh = selectors.configuration_list().get(pk=configuration.pk)
        return Response(s.ConfigurationSerializer(fresh).data, status=code)

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(s.ConfigurationSerializer(page, many=True).data)

    @extend_schema(request=s.ConfigurationInputSerializer, responses={201: s.ConfigurationSerializer})
    def create(self, request: Request) -> Response:
        data = validated(s.ConfigurationInputSerializer, request.data)
        configuration = services.configuration_create(actor=request.user, **data)
        return self._encode(configuration, code=status.HTTP_201_CREATED)

    def retrieve(self, request: Request, name: str) -> Response:
        return Response(s.ConfigurationSerializer(self.get_object()).data)

    @extend_schema(request=s.ConfigurationInputSerializer, responses=s.ConfigurationSerializer)
    def update(self, request: Request, name: str) -> Response:
        data = validated(s.ConfigurationInputSerializer, request.data)
        configuration = services.configuration_update(configuration=self.get_object(), actor=request.user, **data)
        return self._encode(configuration)

    @extend_schema(request=s.ConfigurationInputSerializer(partial=True), responses=s.ConfigurationSerializer)
    def partial_update(self, request: Request, name: str) -> Response:
        data = validated(s.ConfigurationInputSerializer, request.data, partial=True)
        configuration = services.configuration_update(configuration=self.get_object(), actor=request.user, **data)
        return self._encode(configuration)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, name: str) -> Response:
        services.configuration_delete(configuration=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        parameters=[s.DiffQuerySerializer],
        responses=s.VersionDiffSerializer,
        description="Unified diff per file between two versions of this configuration.",
    )
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def diff(self, request: Request, name: str) -> Response:
        query = validated(s.DiffQuerySerializer, request.query_params)
        configuration = self.get_object()
        older = version_or_400(configuration, query["from"], field="from")
        newer = version_or_400(configuration, query["to"], field="to")
        files = selectors.version_diff(older, newer)
        return Response(s.VersionDiffSerializer({"from": older.number, "to": newer.number, "files": files}).data)

    @extend_schema(
        request=s.RollbackSerializer,
        responses={201: s.ConfigVersionSerializer},
        description="Make an earlier version's content current again, as a new (higher-numbered) version.",
    )
    @action(detail=True, methods=["post"], filter_backends=[], pagination_class=None)
    def rollback(self, request: Request, name: str) -> Response:
        data = validated(s.RollbackSerializer, request.data)
        version = services.configuration_rollback(
            configuration=self.get_object(), to_number=data["version"], author=request.user, note=data["note"]
        )
        return Response(s.ConfigVersionSerializer(version).data, status=status.HTTP_201_CREATED)


class ConfigVersionViewSet(RolloutsAPIMixin, viewsets.GenericViewSet):
    """The immutable versions of one configuration; lists are newest first."""

    serializer_class = s.ConfigVersionSerializer
    lookup_field = "number"
    ordering_fields = ["number", "created_at"]
    ordering = ["-number"]

    def get_queryset(self) -> QuerySet[ConfigVersion]:
        if getattr(self, "swagger_fake_view", False):  # schema generation has no URL kwargs
            return ConfigVersion.objects.none()
        return selectors.version_list(configuration_or_404(self.kwargs["name"]))

    def list(self, request: Request, name: str) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(s.ConfigVersionSerializer(page, many=True).data)

    @extend_schema(
        request=s.PublishSerializer,
        responses={
            201: s.ConfigVersionSerializer,
            200: s.ConfigVersionSerializer,
        },
        description="Publish files as the next version. Content identical to the current version "
        "creates nothing: the answer is 200 with the current version instead of 201.",
    )
    def create(self, request: Request, name: str) -> Response:
        data = validated(s.PublishSerializer, request.data)
        version, created = services.configuration_publish(
            configuration=configuration_or_404(name),
            files=data["files"],
            author=request.user,
            note=data["note"],
            activate=data["activate"],
        )
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(s.ConfigVersionSerializer(version).data, status=code)

    @extend_schema(responses=s.ConfigVersionDetailSerializer)
    def retrieve(self, request: Request, name: str, number: int) -> Response:
        return Response(s.ConfigVersionDetailSerializer(self.get_object()).data)

    @extend_schema(
        responses=s.VersionStatusSerializer, description="How the agents meant to run this version are doing."
    )
    @action(detail=True, methods=["get"], url_path="status", filter_backends=[], pagination_class=None)
    def status_counts(self, request: Request, name: str, number: int) -> Response:
        counts = selectors.version_status_counts(self.get_object())
        return Response(s.VersionStatusSerializer(counts).data)


class SelectorPreviewView(RolloutsAPIMixin, generics.GenericAPIView):
    """Which agents a selector would pick, before it is saved anywhere."""

    serializer_class = s.SelectorPreviewInputSerializer

    # A preview only reads; it is a POST because the dict form of a selector does not fit a
    # query string. Viewers may use it.
    read_only_methods = ("POST",)

    @extend_schema(request=s.SelectorPreviewInputSerializer, responses=s.SelectorPreviewSerializer)
    def post(self, request: Request) -> Response:
        data = validated(s.SelectorPreviewInputSerializer, request.data)
        preview = selectors.selector_preview(data["selector"], limit=PREVIEW_LIMIT)
        return Response(s.SelectorPreviewSerializer(preview).data)


class _AgentMixin:
    kwargs: dict[str, Any]

    def get_agent(self) -> Agent:
        return get_object_or_404(fleet_selectors.agent_list(), instance_uid=self.kwargs["instance_uid"])

    def get_object(self) -> Agent:
        # DRF's hook for the view's object: an OPTIONS request asks it for a view that
        # takes PUT, and the generic one (with no queryset here) failed with a 500.
        return self.get_agent()


class AgentLabelsView(RolloutsAPIMixin, _AgentMixin, generics.GenericAPIView):
    """An agent's operator labels; PUT replaces them, PATCH merges into them."""

    serializer_class = s.AgentLabelsSerializer

    @extend_schema(responses=s.AgentLabelsSerializer)
    def get(self, request: Request, instance_uid: uuid.UUID) -> Response:
        return Response(s.AgentLabelsSerializer(self.get_agent()).data)

    def _set(self, request: Request, *, replace: bool) -> Response:
        data = validated(s.AgentLabelsInputSerializer, request.data)
        agent = agent_labels.agent_labels_set(
            instance_uid=self.get_agent().instance_uid, labels=data["labels"], actor=request.user, replace=replace
        )
        return Response(s.AgentLabelsSerializer(agent).data)

    @extend_schema(
        request=s.AgentLabelsInputSerializer,
        responses=s.AgentLabelsSerializer,
        description="Replace the operator labels; the agent's desired configuration is re-resolved.",
    )
    def put(self, request: Request, instance_uid: uuid.UUID) -> Response:
        return self._set(request, replace=True)

    @extend_schema(
        request=s.AgentLabelsInputSerializer,
        responses=s.AgentLabelsSerializer,
        description="Merge into the operator labels; the agent's desired configuration is re-resolved.",
    )
    def patch(self, request: Request, instance_uid: uuid.UUID) -> Response:
        return self._set(request, replace=False)


class AgentConfigView(RolloutsAPIMixin, _AgentMixin, generics.GenericAPIView):
    """The agent's remote-config picture: desired version, what it reports, drift."""

    serializer_class = s.AgentConfigStateSerializer

    @extend_schema(responses=s.AgentConfigStateSerializer)
    def get(self, request: Request, instance_uid: uuid.UUID) -> Response:
        return Response(s.AgentConfigStateSerializer(selectors.agent_config_state(self.get_agent())).data)


class ReconcilerStateView(RolloutsAPIMixin, generics.GenericAPIView):
    """The desired-state reconciler's last run and its repair count (read only)."""

    serializer_class = s.ReconcilerStateSerializer

    @extend_schema(responses=s.ReconcilerStateSerializer)
    def get(self, request: Request) -> Response:
        return Response(s.ReconcilerStateSerializer(reconciler.reconciler_state()).data)
