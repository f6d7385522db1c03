"""Shapes of the signing API. Input serializers check shape only; what a value means (a
valid label, a pending request, a certificate not yet revoked) is decided by the services.
Output serializers carry public material only: public keys, CSRs and certificates. No
private key and no enrollment secret is ever a field here, except the secret of a token in
the one answer that creates it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework import serializers

from fleet.api.validation import LabelsField, StrictSerializer
from signing import selectors
from signing.certificates import certificate_needs_renewal
from signing.errors import TOKEN_LIFETIME_INVALID
from signing.models import REVOKED_UNSPECIFIED, CertificateRequest, EnrollmentToken, IssuedCertificate, SigningKey

SIGNING_ALGORITHM = "ed25519"
# Far beyond any sensible enrollment window; it keeps the expiry date computable.
MAX_TOKEN_LIFETIME = timedelta(days=3650)
MAX_USES_LIMIT = 2**31 - 1
EXPIRY_NEEDED = "give exactly one of expires_in_seconds and expires_at"
TOKEN_LIFETIME_TOO_LONG = "an enrollment token may be valid for at most 3650 days"
REVOCATION_REASON_INVALID = "the reason must be one of: " + ", ".join(IssuedCertificate.RevocationReason.values)


# Signing keys


class SigningKeySerializer(serializers.ModelSerializer):
    algorithm = serializers.SerializerMethodField()
    accepted = serializers.BooleanField(
        read_only=True, help_text="signatures made with this key are accepted (it is not retired)"
    )

    class Meta:
        model = SigningKey
        fields = ["key_id", "algorithm", "public_key_pem", "active", "accepted", "created_at", "retired_at"]
        read_only_fields = fields

    def get_algorithm(self, key: SigningKey) -> str:
        return SIGNING_ALGORITHM


class TrustedKeySerializer(serializers.Serializer):
    key_id = serializers.CharField()
    algorithm = serializers.CharField()
    public_key_pem = serializers.CharField()


# Enrollment tokens


class EnrollmentTokenInputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    expires_in_seconds = serializers.IntegerField(
        required=False, min_value=1, max_value=int(MAX_TOKEN_LIFETIME.total_seconds())
    )
    expires_at = serializers.DateTimeField(required=False, help_text="instead of expires_in_seconds")
    max_uses = serializers.IntegerField(min_value=1, max_value=MAX_USES_LIMIT, help_text="agents it may enrol")
    labels = LabelsField(default=dict, help_text="applied to each agent enrolled with the token")
    auto_approve = serializers.BooleanField(
        default=False, help_text="issue certificates to agents enrolled with this token without operator approval"
    )

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if ("expires_in_seconds" in data) == ("expires_at" in data):
            raise serializers.ValidationError({"expires_in_seconds": [EXPIRY_NEEDED]})
        if "expires_at" in data:
            expires_in = data.pop("expires_at") - timezone.now()
            if expires_in <= timedelta(0):
                raise serializers.ValidationError({"expires_at": [TOKEN_LIFETIME_INVALID]})
            if expires_in > MAX_TOKEN_LIFETIME:
                raise serializers.ValidationError({"expires_at": [TOKEN_LIFETIME_TOO_LONG]})
        else:
            expires_in = timedelta(seconds=data.pop("expires_in_seconds"))
        data["expires_in"] = expires_in
        return data


class EnrollmentTokenSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", read_only=True, allow_null=True)
    labels = serializers.DictField(child=serializers.CharField(), read_only=True)
    state = serializers.SerializerMethodField()

    class Meta:
        model = EnrollmentToken
        fields = [
            "id",
            "name",
            "prefix",
            "state",
            "created_by",
            "created_at",
            "expires_at",
            "max_uses",
            "use_count",
            "labels",
            "auto_approve",
            "revoked_at",
        ]
        read_only_fields = fields

    def get_state(self, token: EnrollmentToken) -> str:
        """active, expired, exhausted or revoked"""
        return selectors.enrollment_token_state(token)


class EnrollmentTokenCreatedSerializer(EnrollmentTokenSerializer):
    """The token just created, with its secret: shown in this answer only, never stored."""

    secret = serializers.SerializerMethodField()

    class Meta(EnrollmentTokenSerializer.Meta):
        fields = [*EnrollmentTokenSerializer.Meta.fields, "secret"]
        read_only_fields = fields

    def get_secret(self, token: EnrollmentToken) -> str:
        """what agents present to enrol; copy it now, it cannot be shown again"""
        secret: str = self.context["secret"]
        return secret


# Certificate requests


class EnrollmentTokenRefSerializer(serializers.ModelSerializer):
    class Meta:
        model = EnrollmentToken
        fields = ["id", "name", "prefix"]
        read_only_fields = fields


class CertificateRequestSerializer(serializers.ModelSerializer):
    decided_by = serializers.CharField(source="decided_by.username", read_only=True, allow_null=True)
    enrollment_token = EnrollmentTokenRefSerializer(read_only=True, allow_null=True)
    certificate = serializers.SerializerMethodField()

    class Meta:
        model = CertificateRequest
        fields = [
            "id",
            "instance_uid",
            "state",
            "key_type",
            "reason",
            "requested_at",
            "decided_by",
            "decided_at",
            "enrollment_token",
            "certificate",
        ]
        read_only_fields = fields

    def get_certificate(self, request: CertificateRequest) -> int | None:
        """the id of the certificate issued for this request"""
        certificate = getattr(request, "certificate", None)  # reverse one-to-one: absent raises AttributeError
        return certificate.pk if certificate is not None else None


class CertificateRequestDetailSerializer(CertificateRequestSerializer):
    class Meta(CertificateRequestSerializer.Meta):
        fields = [*CertificateRequestSerializer.Meta.fields, "csr_pem"]
        read_only_fields = fields


class RejectSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=2000, help_text="why; kept with the request and in the audit trail")


# Certificates


class CertificateSerializer(serializers.ModelSerializer):
    serial = serializers.CharField(source="serial_hex", read_only=True, help_text="hexadecimal")
    request = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    ca_fingerprint_sha256 = serializers.CharField(source="authority.fingerprint_sha256", read_only=True)
    needs_renewal = serializers.SerializerMethodField()

    class Meta:
        model = IssuedCertificate
        fields = [
            "id",
            "serial",
            "subject",
            "fingerprint_sha256",
            "instance_uid",
            "not_before",
            "not_after",
            "issued_at",
            "needs_renewal",
            "revoked_at",
            "revocation_reason",
            "request",
            "ca_fingerprint_sha256",
        ]
        read_only_fields = fields

    def get_needs_renewal(self, certificate: IssuedCertificate) -> bool:
        """less than a third of the validity is left (by dates alone)"""
        return certificate_needs_renewal(certificate)


class CertificateDetailSerializer(CertificateSerializer):
    class Meta(CertificateSerializer.Meta):
        fields = [*CertificateSerializer.Meta.fields, "pem"]
        read_only_fields = fields


class RevokeSerializer(StrictSerializer):
    reason = serializers.ChoiceField(
        choices=IssuedCertificate.RevocationReason.choices,
        default=REVOKED_UNSPECIFIED,
        error_messages={"invalid_choice": REVOCATION_REASON_INVALID},
    )


# The CA


class CertificateAuthoritySerializer(serializers.Serializer):
    subject = serializers.CharField()
    fingerprint_sha256 = serializers.CharField(help_text="SHA-256 of the certificate's DER, hexadecimal")
    not_before = serializers.DateTimeField()
    not_after = serializers.DateTimeField()
    certificate_pem = serializers.CharField()
