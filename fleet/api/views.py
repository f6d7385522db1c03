from __future__ import annotations

import django_filters
from django.db.models import QuerySet
from rest_framework import mixins, viewsets
from rest_framework.serializers import BaseSerializer

from fleet import selectors
from fleet.api.filters import AgentFilter
from fleet.api.permissions import RolePermission
from fleet.api.serializers import AgentSerializer, AgentSummarySerializer, AuditEventSerializer
from fleet.models import Agent, AuditEvent


class AgentViewSet(viewsets.ReadOnlyModelViewSet):
    """The fleet inventory: list (filterable, paginated) and detail by instance_uid.

    Effective configs and addresses are operator data: reading them needs a role.
    """

    permission_classes = [RolePermission]
    lookup_field = "instance_uid"
    filterset_class = AgentFilter
    ordering_fields = ["last_seen", "first_seen", "connected_at"]
    ordering = ["-last_seen"]

    def get_queryset(self) -> QuerySet[Agent]:
        return selectors.agent_list()

    def get_serializer_class(self) -> type[BaseSerializer]:
        return AgentSummarySerializer if self.action == "list" else AgentSerializer


class AuditEventFilter(django_filters.FilterSet):
    actor = django_filters.CharFilter(field_name="actor__username", help_text="the username of who made the change")

    class Meta:
        model = AuditEvent
        fields = ["action", "target_type", "target_id", "actor"]


class AuditEventViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Who changed what, newest first."""

    permission_classes = [RolePermission]
    serializer_class = AuditEventSerializer
    filterset_class = AuditEventFilter
    ordering_fields = ["at"]
    ordering = ["-at", "-id"]

    def get_queryset(self) -> QuerySet[AuditEvent]:
        return selectors.audit_list()
