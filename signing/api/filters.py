"""Query filters of the signing API's lists."""

from __future__ import annotations

import django_filters
from django import forms
from django.db.models import QuerySet

from signing import selectors
from signing.models import CertificateRequest, EnrollmentToken, IssuedCertificate, SigningKey

# About 100 years: any larger window is the same answer, and the date stays computable.
MAX_EXPIRING_DAYS = 36500


class IntegerFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField


class SigningKeyFilter(django_filters.FilterSet):
    accepted = django_filters.BooleanFilter(
        field_name="retired_at", lookup_expr="isnull", help_text="true: keys not retired (the ones to trust)"
    )

    class Meta:
        model = SigningKey
        fields = ["active", "accepted"]


class EnrollmentTokenFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(
        choices=selectors.TokenState.CHOICES, method="filter_state", help_text="active, expired, exhausted or revoked"
    )

    class Meta:
        model = EnrollmentToken
        fields = ["state", "auto_approve"]

    def filter_state(self, queryset: QuerySet[EnrollmentToken], name: str, value: str) -> QuerySet[EnrollmentToken]:
        return queryset.filter(selectors.enrollment_token_state_q(value))


class CertificateRequestFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=CertificateRequest.State.choices)
    instance_uid = django_filters.UUIDFilter()

    class Meta:
        model = CertificateRequest
        fields = ["state", "instance_uid"]


class CertificateFilter(django_filters.FilterSet):
    instance_uid = django_filters.UUIDFilter()
    revoked = django_filters.BooleanFilter(
        field_name="revoked_at", lookup_expr="isnull", exclude=True, help_text="true: revoked certificates only"
    )
    expiring_within_days = IntegerFilter(
        method="filter_expiring",
        min_value=0,
        max_value=MAX_EXPIRING_DAYS,
        help_text="not yet expired, and valid for at most this many more days",
    )

    class Meta:
        model = IssuedCertificate
        fields = ["instance_uid", "revoked", "expiring_within_days"]

    def filter_expiring(
        self, queryset: QuerySet[IssuedCertificate], name: str, value: int
    ) -> QuerySet[IssuedCertificate]:
        return selectors.certificates_expiring_within(queryset, days=value)
