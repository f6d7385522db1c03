"""Admin for keys, the CA, certificate requests, certificates and enrollment tokens.

Rows with a state machine are read-only here; every change is an action that goes
through the signing services (and so is conditional, one-shot and audited). The role rules
of the API apply (`fleet.roles`): viewers see, and actions need the operator role, checked
apart from the read-only form.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.utils.html import format_html

from fleet.admin_base import CreateOnlyRoleAdminMixin, ReadOnlyRoleAdminMixin, preformatted
from fleet.roles import can_write
from signing import selectors
from signing.certificates import (
    ApprovalOutcome,
    certificate_request_approve,
    certificate_request_reject,
    certificate_revoke,
)
from signing.enrollment_tokens import enrollment_labels_check, enrollment_token_create, enrollment_token_revoke
from signing.errors import SigningError
from signing.models import (
    REVOKED_KEY_COMPROMISE,
    REVOKED_UNSPECIFIED,
    CertificateAuthority,
    CertificateRequest,
    EnrollmentToken,
    EnrollmentTokenUse,
    IssuedCertificate,
    SigningKey,
)
from signing.signing_keys import signing_key_retire


class ReadOnlyAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    """Viewable, never edited or deleted in a form: changes are the actions below."""

    def has_decide_permission(self, request: HttpRequest) -> bool:
        return can_write(request.user)


@admin.register(SigningKey)
class SigningKeyAdmin(ReadOnlyAdmin):
    list_display = ["key_id", "active", "is_accepted", "created_at", "retired_at"]
    list_filter = ["active"]
    fields = ["key_id", "active", "is_accepted", "created_at", "retired_at", "public_key"]
    readonly_fields = fields
    actions = ["retire"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[SigningKey]:
        return selectors.signing_key_list()

    @admin.display(boolean=True, description="accepted")
    def is_accepted(self, key: SigningKey) -> bool:
        return key.accepted

    @admin.display(description="public key")
    def public_key(self, key: SigningKey) -> str:
        return preformatted(key.public_key_pem)

    @admin.action(description="Retire the selected keys (no longer accepted, never sign again)", permissions=["decide"])
    def retire(self, request: HttpRequest, queryset: QuerySet[SigningKey]) -> None:
        retired = 0
        for key in queryset:
            try:
                retired += signing_key_retire(key=key, actor=request.user)
            except SigningError as refused:
                self.message_user(request, refused.message, messages.ERROR)
        self.message_user(request, f"{retired} key(s) retired.", messages.SUCCESS)


@admin.register(CertificateAuthority)
class CertificateAuthorityAdmin(ReadOnlyAdmin):
    list_display = ["subject", "fingerprint_sha256", "not_before", "not_after", "created_at"]
    fields = ["subject", "fingerprint_sha256", "not_before", "not_after", "created_at", "certificate"]
    readonly_fields = fields

    @admin.display(description="certificate")
    def certificate(self, authority: CertificateAuthority) -> str:
        return preformatted(authority.certificate_pem)


@admin.register(CertificateRequest)
class CertificateRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "instance_uid", "state", "key_type", "requested_at", "decided_by", "enrollment_token"]
    list_filter = ["state", "key_type"]
    search_fields = ["instance_uid"]
    fields = [
        "instance_uid",
        "state",
        "reason",
        "key_type",
        "requested_at",
        "decided_by",
        "decided_at",
        "enrollment_token",
        "csr",
    ]
    readonly_fields = fields
    actions = ["approve", "reject"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[CertificateRequest]:
        return selectors.certificate_request_list()

    @admin.display(description="CSR")
    def csr(self, request: CertificateRequest) -> str:
        return preformatted(request.csr_pem)

    @admin.action(description="Approve and issue certificates", permissions=["decide"])
    def approve(self, request: HttpRequest, queryset: QuerySet[CertificateRequest]) -> None:
        outcomes: Counter[ApprovalOutcome] = Counter()
        for certificate_request in queryset:
            try:
                outcomes[certificate_request_approve(request=certificate_request, actor=request.user)] += 1
            except SigningError as error:
                self.message_user(request, error.message, messages.ERROR)
                return
        self.message_user(
            request,
            f"{outcomes[ApprovalOutcome.ISSUED]} request(s) approved; "
            f"{outcomes[ApprovalOutcome.NO_LONGER_PASSES]} rejected because the CSR no longer passes the "
            f"policy; {outcomes[ApprovalOutcome.NOT_PENDING]} were no longer pending.",
            messages.SUCCESS,
        )

    @admin.action(description="Reject", permissions=["decide"])
    def reject(self, request: HttpRequest, queryset: QuerySet[CertificateRequest]) -> None:
        rejected = sum(
            certificate_request_reject(request=item, actor=request.user, reason="rejected by an operator")
            for item in queryset
        )
        self.message_user(request, f"{rejected} request(s) rejected.", messages.SUCCESS)


@admin.register(IssuedCertificate)
class IssuedCertificateAdmin(ReadOnlyAdmin):
    list_display = ["subject", "serial_hex", "instance_uid", "not_after", "revoked_at", "revocation_reason"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "revocation_reason"]
    search_fields = ["instance_uid", "serial_hex", "fingerprint_sha256"]
    fields = [
        "subject",
        "instance_uid",
        "serial_hex",
        "fingerprint_sha256",
        "not_before",
        "not_after",
        "issued_at",
        "authority",
        "request",
        "revoked_at",
        "revocation_reason",
        "certificate",
    ]
    readonly_fields = fields
    actions = ["revoke", "revoke_key_compromise"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[IssuedCertificate]:
        return selectors.issued_certificate_list()

    @admin.display(description="certificate")
    def certificate(self, certificate: IssuedCertificate) -> str:
        return preformatted(certificate.pem)

    def _revoke(self, request: HttpRequest, queryset: QuerySet[IssuedCertificate], reason: str) -> None:
        revoked = sum(certificate_revoke(certificate=item, actor=request.user, reason=reason) for item in queryset)
        self.message_user(request, f"{revoked} certificate(s) revoked.", messages.SUCCESS)

    @admin.action(description="Revoke", permissions=["decide"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[IssuedCertificate]) -> None:
        self._revoke(request, queryset, REVOKED_UNSPECIFIED)

    @admin.action(description="Revoke (key compromise)", permissions=["decide"])
    def revoke_key_compromise(self, request: HttpRequest, queryset: QuerySet[IssuedCertificate]) -> None:
        self._revoke(request, queryset, REVOKED_KEY_COMPROMISE)


class EnrollmentTokenCreateForm(ModelForm):
    expires_in_hours = forms.FloatField(min_value=0.01, initial=24.0, help_text="the token stops working after this")

    class Meta:
        model = EnrollmentToken
        fields = ["name", "max_uses", "labels", "auto_approve"]

    def clean_labels(self) -> dict[str, str]:
        try:
            return enrollment_labels_check(self.cleaned_data.get("labels"))
        except SigningError as error:
            raise ValidationError(error.message) from None


class EnrollmentTokenUseInline(ReadOnlyRoleAdminMixin, admin.TabularInline):
    model = EnrollmentTokenUse
    fields = ["instance_uid", "used_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(CreateOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["name", "prefix", "use_count", "max_uses", "expires_at", "auto_approve", "revoked_at"]
    list_filter = ["auto_approve", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix"]
    readonly_fields = [
        "name",
        "prefix",
        "created_by",
        "created_at",
        "expires_at",
        "max_uses",
        "use_count",
        "labels",
        "auto_approve",
        "revoked_at",
    ]
    actions = ["revoke"]
    inlines = [EnrollmentTokenUseInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[EnrollmentToken]:
        return selectors.enrollment_token_list()

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = EnrollmentTokenCreateForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ["name", "expires_in_hours", "max_uses", "labels", "auto_approve"]
        return self.readonly_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [] if obj is None else self.readonly_fields

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.inlines if obj is not None else []

    def has_decide_permission(self, request: HttpRequest) -> bool:
        return can_write(request.user)

    def save_model(self, request: HttpRequest, obj: EnrollmentToken, form: Any, change: bool) -> None:
        if change:
            return
        data = form.cleaned_data
        token, secret = enrollment_token_create(
            name=data["name"],
            expires_in=timedelta(hours=data["expires_in_hours"]),
            max_uses=data["max_uses"],
            labels=data["labels"],
            auto_approve=data["auto_approve"],
            actor=request.user,
        )
        # The admin goes on to log and redirect using `obj`: make it the row the service saved.
        for field in EnrollmentToken._meta.concrete_fields:
            setattr(obj, field.attname, getattr(token, field.attname))
        obj._state.adding = False
        obj._state.db = token._state.db
        messages.warning(
            request,
            format_html(
                "Secret for enrollment token {}: <code>{}</code> Copy it now: it is not stored and will not be "
                "shown again.",
                token.name,
                secret,
            ),
        )

    @admin.action(description="Revoke (agents already enrolled keep working)", permissions=["decide"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[EnrollmentToken]) -> None:
        revoked = sum(enrollment_token_revoke(token=token, actor=request.user) for token in queryset)
        self.message_user(request, f"{revoked} token(s) revoked.", messages.SUCCESS)
