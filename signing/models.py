"""Public signing keys, the CA, certificate requests and certificates, enrollment tokens.

Nothing here holds private material: private keys live in files named by settings, and
enrollment tokens are stored as SHA-256 hashes. Agents are referred to by instance uid,
not by foreign key, because certificates and their audit trail must outlive an agent's
inventory row (a deleted agent's certificate still has to appear in the CRL).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone


class SigningKey(models.Model):
    """The public half of a config-signing Ed25519 key.

    `active` marks the key new signatures are made with (at most one). Every key that is
    not retired stays accepted for verification, so keys rotate without re-enrolling
    agents; retiring a key withdraws that acceptance for good.
    """

    key_id = models.CharField(max_length=16, unique=True)
    public_key_pem = models.TextField()
    active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-active", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["active"], condition=Q(active=True), name="signing_key_single_active"),
        ]

    def __str__(self) -> str:
        return self.key_id

    @property
    def accepted(self) -> bool:
        return self.retired_at is None


class CertificateAuthority(models.Model):
    """A CA certificate (public part only) that agent certificates were issued under."""

    subject = models.CharField(max_length=500)
    certificate_pem = models.TextField()
    fingerprint_sha256 = models.CharField(max_length=64, unique=True)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "certificate authorities"

    def __str__(self) -> str:
        return f"{self.subject} ({self.fingerprint_sha256[:16]})"


class EnrollmentToken(models.Model):
    """A shared secret that lets new agents enrol, a bounded number of times, until it expires.

    Only the SHA-256 of the secret is stored; `prefix` is the start of the secret, kept so
    operators can tell tokens apart. `labels` are applied to each agent that enrols with it.
    """

    name = models.CharField(max_length=200)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=32)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    max_uses = models.PositiveIntegerField()
    use_count = models.PositiveIntegerField(default=0)
    labels = models.JSONField(default=dict, blank=True)
    auto_approve = models.BooleanField(
        default=False, help_text="issue certificates to agents enrolled with this token without operator approval"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # The conditional UPDATE in enrollment_token_use is the real guard; this makes
            # the database refuse any other path that would overshoot.
            models.CheckConstraint(condition=Q(use_count__lte=F("max_uses")), name="enrollment_token_uses_bounded"),
            models.CheckConstraint(condition=Q(max_uses__gte=1), name="enrollment_token_max_uses_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class EnrollmentTokenUse(models.Model):
    """One agent enrolled with a token. An agent enrolling again with the same token is not a new use."""

    token = models.ForeignKey(EnrollmentToken, on_delete=models.CASCADE, related_name="uses")
    instance_uid = models.UUIDField()
    used_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-used_at"]
        constraints = [
            models.UniqueConstraint(fields=["token", "instance_uid"], name="enrollment_token_use_once_per_agent"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_uid} via {self.token_id}"


class CertificateRequest(models.Model):
    """An agent's CSR and the decision on it.

    pending -> approved -> issued, or pending -> rejected. Each transition is one
    conditional UPDATE on the old state (signing.certificates), so a repeated decision is a
    no-op. CSRs that fail policy are stored as rejected too: they count toward the
    agent's rate limit and show operators what was refused.
    """

    class State(models.TextChoices):
        PENDING = "pending", "pending"
        APPROVED = "approved", "approved"
        REJECTED = "rejected", "rejected"
        ISSUED = "issued", "issued"

    instance_uid = models.UUIDField()
    csr_pem = models.TextField(blank=True)
    key_type = models.CharField(max_length=32, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    reason = models.TextField(blank=True)
    requested_at = models.DateTimeField(default=timezone.now)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    enrollment_token = models.ForeignKey(
        EnrollmentToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="certificate_requests"
    )

    class Meta:
        ordering = ["-requested_at", "-id"]
        indexes = [models.Index(fields=["instance_uid", "requested_at"], name="cert_request_uid_time_idx")]

    def __str__(self) -> str:
        return f"CSR {self.pk} from {self.instance_uid} ({self.state})"


# Plain strings for the two reasons code passes around (the choices' members are typed
# as tuples by tools that do not know TextChoices).
REVOKED_UNSPECIFIED = "unspecified"
REVOKED_KEY_COMPROMISE = "key_compromise"


class IssuedCertificate(models.Model):
    """A client certificate issued to one agent instance; revocation is final."""

    class RevocationReason(models.TextChoices):
        UNSPECIFIED = REVOKED_UNSPECIFIED, "unspecified"
        KEY_COMPROMISE = REVOKED_KEY_COMPROMISE, "key compromise"
        SUPERSEDED = "superseded", "superseded"
        CESSATION_OF_OPERATION = "cessation_of_operation", "cessation of operation"
        AFFILIATION_CHANGED = "affiliation_changed", "affiliation changed"
        PRIVILEGE_WITHDRAWN = "privilege_withdrawn", "privilege withdrawn"

    request = models.OneToOneField(
        CertificateRequest, null=True, blank=True, on_delete=models.SET_NULL, related_name="certificate"
    )
    authority = models.ForeignKey(CertificateAuthority, on_delete=models.PROTECT, related_name="issued")
    # Serials are random 159-bit numbers: at most 40 hex digits.
    serial_hex = models.CharField(max_length=40, unique=True)
    subject = models.CharField(max_length=200)
    instance_uid = models.UUIDField(db_index=True)
    fingerprint_sha256 = models.CharField(max_length=64, unique=True)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    pem = models.TextField()
    issued_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.CharField(max_length=32, choices=RevocationReason.choices, blank=True)

    class Meta:
        ordering = ["-issued_at", "-id"]

    def __str__(self) -> str:
        return f"{self.subject} #{self.serial_hex[:16]}"

    @property
    def serial(self) -> int:
        return int(self.serial_hex, 16)
