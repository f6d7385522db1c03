"""Telemetry connection settings: operators write, viewers read (fleet.connection_settings).

The fleet's router adds format suffixes (`.json`), passed to each action as `format`."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from fleet import connection_settings as services
from fleet.api import telemetry_settings_serializers as s
from fleet.api.validation import validated
from fleet.models import TelemetryConnectionSettings
from fleet.roles import can_write


class TelemetrySettingsViewSet(viewsets.GenericViewSet):
    """Telemetry connection settings by name: the agents they are for, and what they set."""

    serializer_class = s.TelemetrySettingsSerializer
    lookup_field = "name"
    lookup_value_regex = "[^/]+"
    ordering_fields = ["name", "priority", "created_at", "updated_at"]
    ordering = ["-priority", "name"]

    def get_queryset(self) -> QuerySet[TelemetryConnectionSettings]:
        return services.telemetry_settings_list().select_related("created_by")

    def _shown(self, request: Request, data: Any, **kwargs: Any) -> Any:
        # Header values may be credentials: operators read them, viewers see the names.
        return s.TelemetrySettingsSerializer(data, context={"reveal": can_write(request.user)}, **kwargs).data

    def list(self, request: Request, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(self._shown(request, page, many=True))

    @extend_schema(request=s.TelemetrySettingsInputSerializer, responses={201: s.TelemetrySettingsSerializer})
    def create(self, request: Request, **kwargs: Any) -> Response:
        data = validated(s.TelemetrySettingsInputSerializer, request.data)
        entry = services.telemetry_settings_create(actor=request.user, **data)
        return Response(self._shown(request, entry), status=status.HTTP_201_CREATED)

    def retrieve(self, request: Request, name: str, **kwargs: Any) -> Response:
        return Response(self._shown(request, self.get_object()))

    @extend_schema(request=s.TelemetrySettingsInputSerializer, responses=s.TelemetrySettingsSerializer)
    def update(self, request: Request, name: str, **kwargs: Any) -> Response:
        data = validated(s.TelemetrySettingsInputSerializer, request.data)
        entry = services.telemetry_settings_update(entry=self.get_object(), actor=request.user, **data)
        return Response(self._shown(request, entry))

    @extend_schema(request=s.TelemetrySettingsInputSerializer(partial=True), responses=s.TelemetrySettingsSerializer)
    def partial_update(self, request: Request, name: str, **kwargs: Any) -> Response:
        data = validated(s.TelemetrySettingsInputSerializer, request.data, partial=True)
        entry = services.telemetry_settings_update(entry=self.get_object(), actor=request.user, **data)
        return Response(self._shown(request, entry))

    def destroy(self, request: Request, name: str, **kwargs: Any) -> Response:
        services.telemetry_settings_delete(entry=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
