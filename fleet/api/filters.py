from __future__ import annotations

import django_filters
from django.db.models import QuerySet
from rest_framework.exceptions import ValidationError

from fleet import extensions, selectors
from fleet.custom_messages import with_custom_capability
from fleet.models import Agent, Transport


class AgentFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(
        choices=selectors.AgentStatus.CHOICES, method="filter_status", help_text="online, unhealthy or offline"
    )
    capability = django_filters.CharFilter(
        method="filter_capability", help_text="a capability name, e.g. accepts_remote_config"
    )
    custom_capability = django_filters.CharFilter(
        method="filter_custom_capability",
        help_text="a custom capability the agent declared, e.g. io.opamp.certificate/v1",
    )
    attribute = django_filters.CharFilter(
        method="filter_attribute",
        help_text="key=value on identifying or non-identifying attributes, e.g. service.name=checkout",
    )
    transport = django_filters.ChoiceFilter(choices=Transport.choices)
    connected = django_filters.BooleanFilter()
    seen_after = django_filters.IsoDateTimeFilter(field_name="last_seen", lookup_expr="gte")
    drift = django_filters.BooleanFilter(
        method="filter_drift", help_text="true: agents whose effective config differs from their desired version"
    )

    class Meta:
        model = Agent
        fields = [
            "status",
            "capability",
            "custom_capability",
            "attribute",
            "transport",
            "connected",
            "seen_after",
            "drift",
        ]

    def filter_status(self, queryset: QuerySet[Agent], name: str, value: str) -> QuerySet[Agent]:
        return queryset.filter(selectors.status_q(value))

    def filter_capability(self, queryset: QuerySet[Agent], name: str, value: str) -> QuerySet[Agent]:
        try:
            return selectors.with_capability(queryset, value)
        except ValueError as error:
            raise ValidationError({"capability": [str(error)]}) from None

    def filter_custom_capability(self, queryset: QuerySet[Agent], name: str, value: str) -> QuerySet[Agent]:
        return with_custom_capability(queryset, value)

    def filter_drift(self, queryset: QuerySet[Agent], name: str, value: bool) -> QuerySet[Agent]:
        # The desired state belongs to a feature app (rollouts), which answers this filter.
        answer = extensions.agent_filter("drift")
        if answer is None:
            raise ValidationError({"drift": ["no installed app tracks a desired configuration"]})
        return answer(queryset, value)

    def filter_attribute(self, queryset: QuerySet[Agent], name: str, value: str) -> QuerySet[Agent]:
        key, sep, wanted = value.partition("=")
        if not sep or not key:
            raise ValidationError({"attribute": ["expected key=value"]})
        try:
            return selectors.with_attribute(queryset, key, wanted)
        except ValueError as error:
            raise ValidationError({"attribute": [str(error)]}) from None
