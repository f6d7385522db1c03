"""The CSR flow: submission, the approval queue, issuance, revocation and the CRL."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from django.db import connection
from django.utils import timezone

from fleet.errors import DomainError
from fleet.models import AuditEvent
from opamp.identifiers import uuid7
from signing import certificates, selectors
from signing.ca import CSR_OTHER_AGENT, CSR_REQUESTS_CA, CsrRejected, build_crl, create_ca
from signing.certificates import (
    AUTO_APPROVAL_WITHHELD,
    SUPERSEDED_REASON,
    ApprovalOutcome,
    certificate_needs_renewal,
    certificate_request_approve,
    certificate_request_reject,
    certificate_request_submit,
    certificate_revoke,
)
from signing.crl import crl_pem, crl_refresh_if_due
from signing.errors import CA_NOT_CONFIGURED, CSR_RATE_LIMITED, CsrRateLimited, SigningError
from signing.models import CertificateRequest, IssuedCertificate
from tests.signing.csrs import make_csr

pytestmark = pytest.mark.django_db

State = CertificateRequest.State


@pytest.fixture
def uid() -> uuid.UUID:
    return uuid7()


def submit(uid: uuid.UUID, *, auto_approve: bool = False, kind: str = "ed25519", **csr: object) -> CertificateRequest:
    return certificate_request_submit(instance_uid=uid, csr_pem=make_csr(kind, **csr), auto_approve=auto_approve)


def test_an_auto_approved_csr_is_issued_at_once(configured_ca, uid):
    request = submit(uid, auto_approve=True, common_name=str(uid))
    assert request.state == State.ISSUED
    certificate = request.certificate
    cert = x509.load_pem_x509_certificate(certificate.pem.encode())
    assert certificate.instance_uid == uid
    assert certificate.subject == f"CN={uid}"
    assert certificate.serial == cert.serial_number
    assert certificate.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert selectors.agent_current_certificate(uid) == certificate
    assert selectors.certificate_for_fingerprint(certificate.fingerprint_sha256) == certificate
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    steps = ["certificate_request.submit", "certificate_request.approve", "certificate.issue"]
    assert [action for action in actions if action in steps] == steps


def test_without_auto_approval_a_csr_waits_for_an_operator(configured_ca, uid):
    request = submit(uid)
    assert request.state == State.PENDING
    assert not IssuedCertificate.objects.exists()
    assert list(selectors.pending_certificate_requests()) == [request]


def test_an_operator_approval_issues_the_certificate_once(configured_ca, uid, operator):
    request = submit(uid, kind="p256")
    assert certificate_request_approve(request=request, actor=operator) is ApprovalOutcome.ISSUED
    assert request.state == State.ISSUED and request.decided_by == operator
    assert certificate_request_approve(request=request, actor=operator) is ApprovalOutcome.NOT_PENDING
    assert IssuedCertificate.objects.filter(instance_uid=uid).count() == 1
    assert AuditEvent.objects.filter(action="certificate_request.approve").count() == 1


def test_a_rejection_is_final_and_a_later_approval_changes_nothing(configured_ca, uid, operator):
    request = submit(uid)
    assert certificate_request_reject(request=request, actor=operator, reason="unknown host") is True
    assert certificate_request_reject(request=request, actor=operator) is False
    assert certificate_request_approve(request=request, actor=operator) is ApprovalOutcome.NOT_PENDING
    request.refresh_from_db()
    assert (request.state, request.reason) == (State.REJECTED, "unknown host")
    assert not IssuedCertificate.objects.exists()


def test_a_refused_csr_is_recorded_and_raised_as_a_domain_error(configured_ca, uid):
    with pytest.raises(CsrRejected) as refused:
        submit(uid, auto_approve=True, ca=True)
    assert refused.value.message == CSR_REQUESTS_CA
    assert isinstance(refused.value, DomainError) and refused.value.status == 400
    stored = CertificateRequest.objects.get(instance_uid=uid)
    assert (stored.state, stored.reason) == (State.REJECTED, CSR_REQUESTS_CA)


def test_a_csr_naming_another_agent_is_refused(configured_ca, uid):
    with pytest.raises(CsrRejected) as refused:
        submit(uid, auto_approve=True, common_name=str(uuid7()))
    assert refused.value.message == CSR_OTHER_AGENT
    assert not IssuedCertificate.objects.exists()


def test_resending_the_same_csr_returns_the_earlier_request(configured_ca, uid):
    pem = make_csr(common_name=str(uid))
    first = certificate_request_submit(instance_uid=uid, csr_pem=pem, auto_approve=True)
    again = certificate_request_submit(instance_uid=uid, csr_pem=pem, auto_approve=True)
    assert again.pk == first.pk
    assert IssuedCertificate.objects.count() == 1


def test_a_new_csr_supersedes_the_agents_pending_one(configured_ca, uid):
    first = submit(uid, kind="ed25519")
    second = submit(uid, kind="p256")
    first.refresh_from_db()
    assert (first.state, second.state) == (State.REJECTED, State.PENDING)
    assert first.reason == SUPERSEDED_REASON


def test_csr_submissions_are_rate_limited_per_agent(configured_ca, settings, uid):
    settings.OPAMP_CSR_MAX_PER_HOUR = 2
    submit(uid, kind="ed25519")
    with pytest.raises(CsrRejected):
        submit(uid, ca=True)  # refused CSRs count too
    with pytest.raises(CsrRateLimited) as limited:
        submit(uid, kind="p256")
    assert limited.value.message == CSR_RATE_LIMITED.format(limit=2)
    assert limited.value.status == 429
    # Another agent is not affected, and the window moves on.
    submit(uuid7(), kind="p256")
    later = timezone.now() + timedelta(hours=1, seconds=1)
    request = certificate_request_submit(instance_uid=uid, csr_pem=make_csr("p384"), auto_approve=False, now=later)
    assert request.state == State.PENDING


def test_without_a_ca_no_csr_is_accepted(settings, uid):
    settings.OPAMP_CA_KEY_FILE = settings.OPAMP_CA_CERT_FILE = ""
    with pytest.raises(SigningError) as refused:
        submit(uid, auto_approve=True)
    assert (refused.value.message, refused.value.status) == (CA_NOT_CONFIGURED, 503)


def test_a_revoked_certificate_appears_in_the_crl_and_revoking_again_changes_nothing(configured_ca, uid, operator):
    certificate = submit(uid, auto_approve=True).certificate
    kept = submit(uuid7(), auto_approve=True).certificate
    assert certificate_revoke(certificate=certificate, actor=operator, reason="key_compromise") is True
    revoked_at = certificate.revoked_at
    assert certificate_revoke(certificate=certificate, actor=operator) is False
    certificate.refresh_from_db()
    assert (certificate.revoked_at, certificate.revocation_reason) == (revoked_at, "key_compromise")
    assert AuditEvent.objects.filter(action="certificate.revoke").count() == 1

    crl = x509.load_pem_x509_crl(crl_pem())
    assert crl.is_signature_valid(configured_ca.ca.cert.public_key())
    assert crl.issuer == configured_ca.ca.cert.subject
    entry = crl.get_revoked_certificate_by_serial_number(certificate.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(kept.serial) is None
    assert selectors.certificate_for_fingerprint(certificate.fingerprint_sha256) is None
    assert selectors.certificate_is_revoked(certificate.serial_hex)
    assert selectors.agent_current_certificate(uid) is None


def test_an_agent_with_a_revoked_certificate_is_not_auto_approved_again(configured_ca, uid, operator):
    certificate = submit(uid, auto_approve=True).certificate
    certificate_revoke(certificate=certificate, actor=operator)
    request = submit(uid, auto_approve=True, kind="p256")
    assert request.state == State.PENDING
    assert request.reason == AUTO_APPROVAL_WITHHELD


def test_a_certificate_needs_renewal_once_two_thirds_of_its_validity_passed(configured_ca, uid):
    certificate = submit(uid, auto_approve=True).certificate
    lifetime = certificate.not_after - certificate.not_before
    assert not certificate_needs_renewal(certificate, certificate.not_before + lifetime * 0.6)
    assert certificate_needs_renewal(certificate, certificate.not_before + lifetime * 0.7)


def test_issued_validity_is_capped_by_the_maximum_setting(configured_ca, settings, uid):
    settings.OPAMP_CERT_VALIDITY_DAYS = 365
    settings.OPAMP_CERT_MAX_VALIDITY_DAYS = 30
    certificate = submit(uid, auto_approve=True).certificate
    assert certificate.not_after - certificate.not_before == timedelta(days=30)


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_of_one_request_issue_one_certificate(configured_ca, uid, operator):
    if connection.vendor != "postgresql":
        pytest.skip("row-level concurrency is only meaningful on PostgreSQL")
    request = submit(uid)
    barrier = threading.Barrier(4)
    results: list[ApprovalOutcome] = []

    def approve() -> None:
        try:
            barrier.wait()
            copy = CertificateRequest.objects.get(pk=request.pk)
            results.append(certificate_request_approve(request=copy, actor=operator))
        finally:
            connection.close()

    threads = [threading.Thread(target=approve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [ApprovalOutcome.ISSUED] + [ApprovalOutcome.NOT_PENDING] * 3
    assert IssuedCertificate.objects.filter(instance_uid=uid).count() == 1


def test_issuing_and_revoking_hint_the_agents_live_session_after_commit(
    configured_ca, uid, operator, monkeypatch, django_capture_on_commit_callbacks, tmp_path, settings
):
    settings.OPAMP_CRL_FILE = str(tmp_path / "agents.crl.pem")
    hinted: list[tuple[str, list[uuid.UUID]]] = []
    monkeypatch.setattr(certificates, "notify_certificate_issued", lambda uids: hinted.append(("issued", list(uids))))
    monkeypatch.setattr(certificates, "notify_credentials_revoked", lambda uids: hinted.append(("revoked", list(uids))))
    request = submit(uid)
    with django_capture_on_commit_callbacks(execute=True):
        certificate_request_approve(request=request, actor=operator)
    assert hinted == [("issued", [uid])]
    with django_capture_on_commit_callbacks(execute=False) as pending:
        certificate_revoke(certificate=request.certificate, actor=operator)
    # Nothing leaves the transaction before it commits: no hint, no CRL file.
    assert hinted == [("issued", [uid])] and not (tmp_path / "agents.crl.pem").exists()
    for callback in pending:
        callback()
    assert hinted == [("issued", [uid]), ("revoked", [uid])]
    crl = x509.load_pem_x509_crl((tmp_path / "agents.crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(request.certificate.serial) is not None


def test_the_periodic_crl_refresh_rewrites_the_configured_file(configured_ca, tmp_path, settings, uid, operator):
    from signing.tasks import refresh_crl

    assert refresh_crl() == "no CRL file configured"
    settings.OPAMP_CRL_FILE = str(tmp_path / "agents.crl.pem")
    request = submit(uid)
    certificate_request_approve(request=request, actor=operator)
    # The revocation's own on-commit write does not run inside this test's transaction.
    certificate_revoke(certificate=request.certificate, actor=operator)
    assert refresh_crl() == f"wrote {tmp_path / 'agents.crl.pem'}"
    crl = x509.load_pem_x509_crl((tmp_path / "agents.crl.pem").read_bytes())
    assert crl.is_signature_valid(configured_ca.ca.cert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(request.certificate.serial) is not None
    assert crl.next_update_utc > timezone.now() + timedelta(hours=23)
    # Fresh: left alone (each rewrite makes the terminator reload).
    assert refresh_crl() == "the CRL file is current"
    # Past half of its window: re-signed.
    later = timezone.now() + timedelta(hours=settings.OPAMP_CRL_NEXT_UPDATE_HOURS * 0.6)
    assert crl_refresh_if_due(now=later) == tmp_path / "agents.crl.pem"
    # Signed by some other CA (a replaced CA, a stray file): replaced at once.
    other_ca = create_ca(common_name="Someone else", days=30)
    (tmp_path / "agents.crl.pem").write_bytes(
        build_crl([], ca_key=other_ca.key, ca_cert=other_ca.cert, next_update_hours=24)
    )
    assert refresh_crl() == f"wrote {tmp_path / 'agents.crl.pem'}"


def test_the_periodic_crl_refresh_does_nothing_without_a_ca(settings, tmp_path):
    from signing.tasks import refresh_crl

    settings.OPAMP_CRL_FILE = str(tmp_path / "agents.crl.pem")
    assert refresh_crl() == "no certificate authority configured"
    assert not (tmp_path / "agents.crl.pem").exists()
