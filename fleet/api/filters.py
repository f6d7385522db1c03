from __future__ import annotations

from datetime import UTC, datetime

import django_filters
from django import forms
from django.db.models import QuerySet
from rest_framework.exceptions import ValidationError

from fleet import extensions, selectors
from fleet.custom_messages import with_custom_capability
from fleet.models import Agent, Transport


class UtcIsoDateTimeField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 date-time, compared in UTC.

    PostgreSQL refuses an offset beyond +-15:59 that Python parses (up to +-23:59), and a
    value passed on as given made the query fail (a 500). Moved to UTC it is plain; one that
    leaves the calendar once moved (year 1 or 9999 at the edge) is refused clearly."""

    def clean(self, value: object) -> datetime | None:
        parsed = super().clean(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("the date-time is out of range once converted to UTC", code="invalid") from None


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


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
    seen_after = UtcIsoDateTimeFilter(field_name="last_seen", lookup_expr="gte")
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
