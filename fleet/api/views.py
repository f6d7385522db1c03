from __future__ import annotations

from django.db.models import QuerySet
from rest_framework import viewsets
from rest_framework.serializers import BaseSerializer

from fleet import selectors
from fleet.api.filters import AgentFilter
from fleet.api.serializers import AgentSerializer, AgentSummarySerializer
from fleet.models import Agent
from rollouts.api.permissions import RolePermission


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
