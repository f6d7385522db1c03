"""The signing API: keys, enrollment tokens, the certificate request queue, certificates,
the CA and its CRL; roles, one-time secrets, idempotent verbs and audit rows."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient

from fleet.models import AuditEvent
from fleet.roles import OPERATOR, READ_DENIED, VIEWER, WRITE_DENIED, grant_role
from opamp.identifiers import uuid7
from signing.api.serializers import EXPIRY_NEEDED, REVOCATION_REASON_INVALID
from signing.api.views import CRL_FORMAT_UNKNOWN, CSR_NO_LONGER_PASSES
from signing.ca import CSR_BAD_SIGNATURE
from signing.certificates import certificate_request_submit, certificate_revoke
from signing.config_signing import SigningKeyPair, generate_signing_key
from signing.enrollment_tokens import (
    TOKEN_PREFIX,
    enrollment_token_authenticate,
    enrollment_token_create,
    enrollment_token_revoke,
)
from signing.errors import CA_NOT_CONFIGURED, REQUEST_NOT_PENDING, SIGNING_KEY_IN_USE, TOKEN_LIFETIME_INVALID
from signing.file_cache import reset_file_cache
from signing.models import CertificateRequest, EnrollmentToken, IssuedCertificate, SigningKey
from signing.signing_keys import signing_key_register, signing_key_register_active, signing_key_retire
from tests.fleet.factories import UserFactory
from tests.rollouts.conftest import token_client
from tests.signing.csrs import make_csr, with_broken_signature

pytestmark = pytest.mark.django_db

API = "/api/v1"
PRIVATE_MARKER = b"PRIVATE KEY"  # in every PEM private key label: PKCS#8, EC, RSA, encrypted, OpenSSH
State = CertificateRequest.State


@pytest.fixture
def operator_user(db: Any) -> Any:
    user = UserFactory(username="olga")
    grant_role(user=user, role=OPERATOR)
    return user


@pytest.fixture
def viewer_user(db: Any) -> Any:
    user = UserFactory(username="vera")
    grant_role(user=user, role=VIEWER)
    return user


@pytest.fixture
def api(operator_user: Any) -> APIClient:
    """An API client with the operator role (not a superuser)."""
    return token_client(operator_user)


@pytest.fixture
def viewer_api(viewer_user: Any) -> APIClient:
    return token_client(viewer_user)


def post(client: APIClient, url: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(url, body or {}, format="json")


def register_key(*, active: bool = False) -> SigningKey:
    return signing_key_register(public_key_pem=SigningKeyPair.generate().public_key_pem, actor=None, active=active)


def create_token(**overrides: Any) -> tuple[EnrollmentToken, str]:
    arguments: dict[str, Any] = {
        "name": "edge",
        "expires_in": timedelta(hours=1),
        "max_uses": 5,
        "labels": {"env": "prod"},
        "auto_approve": False,
        "actor": None,
    }
    arguments.update(overrides)
    return enrollment_token_create(**arguments)


def submit(uid: uuid.UUID | None = None, *, auto_approve: bool = False, **extra: Any) -> CertificateRequest:
    uid = uid or uuid7()
    return certificate_request_submit(
        instance_uid=uid,
        csr_pem=make_csr(extra.pop("kind", "ed25519"), common_name=str(uid)),
        auto_approve=auto_approve,
        **extra,
    )


def issued(uid: uuid.UUID | None = None) -> IssuedCertificate:
    return submit(uid, auto_approve=True).certificate


def audit_actions(prefix: str) -> list[tuple[str, str | None]]:
    rows = AuditEvent.objects.filter(action__startswith=prefix).order_by("id").select_related("actor")
    return [(row.action, row.actor.username if row.actor else None) for row in rows]


def results(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.content
    return response.json()["results"]


# Roles


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/signing-keys/"),
        ("get", "/signing-keys/trusted/"),
        ("post", "/signing-keys/0123456789abcdef/retire/"),
        ("get", "/enrollment-tokens/"),
        ("post", "/enrollment-tokens/"),
        ("post", "/enrollment-tokens/1/revoke/"),
        ("get", "/certificate-requests/"),
        ("post", "/certificate-requests/1/approve/"),
        ("post", "/certificate-requests/1/reject/"),
        ("get", "/certificates/"),
        ("post", "/certificates/1/revoke/"),
        ("get", "/ca/"),
        ("get", "/ca/crl/"),
    ],
)
def test_anonymous_requests_are_refused_with_401(method, url):
    response = getattr(APIClient(), method)(API + url, {}, format="json")
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


def test_a_user_without_a_role_cannot_read_tokens_or_certificates():
    client = token_client(UserFactory(username="nobody"))
    for url in ("/enrollment-tokens/", "/certificates/", "/ca/"):
        response = client.get(API + url)
        assert response.status_code == 403, url
        assert response.json()["detail"] == READ_DENIED


def test_a_viewer_can_read_every_signing_endpoint(viewer_api, configured_ca):
    key = register_key(active=True)
    token, _ = create_token()
    request = submit()
    certificate = issued()
    for url in [
        "/signing-keys/",
        f"/signing-keys/{key.key_id}/",
        "/signing-keys/trusted/",
        "/enrollment-tokens/",
        f"/enrollment-tokens/{token.pk}/",
        "/certificate-requests/",
        f"/certificate-requests/{request.pk}/",
        "/certificates/",
        f"/certificates/{certificate.pk}/",
        "/ca/",
        "/ca/crl/",
    ]:
        assert viewer_api.get(API + url).status_code == 200, url


def test_a_viewer_gets_403_on_every_write_and_nothing_changes(viewer_api, configured_ca):
    key = register_key(active=True)
    token, _ = create_token()
    request = submit()
    certificate = issued()
    audit_before = AuditEvent.objects.count()
    writes = [
        (f"/signing-keys/{key.key_id}/retire/", {}),
        ("/enrollment-tokens/", {"name": "x", "expires_in_seconds": 60, "max_uses": 1}),
        (f"/enrollment-tokens/{token.pk}/revoke/", {}),
        (f"/certificate-requests/{request.pk}/approve/", {}),
        (f"/certificate-requests/{request.pk}/reject/", {"reason": "no"}),
        (f"/certificates/{certificate.pk}/revoke/", {"reason": "key_compromise"}),
    ]
    for url, body in writes:
        response = post(viewer_api, API + url, body)
        assert response.status_code == 403, url
        assert response.json()["detail"] == WRITE_DENIED
    key.refresh_from_db()
    token.refresh_from_db()
    request.refresh_from_db()
    certificate.refresh_from_db()
    assert key.retired_at is None and token.revoked_at is None and certificate.revoked_at is None
    assert request.state == State.PENDING
    assert EnrollmentToken.objects.count() == 1
    assert AuditEvent.objects.count() == audit_before


# Signing keys


def test_signing_keys_list_their_public_halves_active_first(viewer_api):
    old = register_key()
    new = register_key(active=True)
    rows = results(viewer_api.get(f"{API}/signing-keys/"))
    assert [row["key_id"] for row in rows] == [new.key_id, old.key_id]
    first = rows[0]
    assert first["algorithm"] == "ed25519"
    assert first["public_key_pem"] == new.public_key_pem
    assert first["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert (first["active"], first["accepted"], first["retired_at"]) == (True, True, None)
    assert parse_datetime(first["created_at"]) == new.created_at
    assert rows[1]["active"] is False


def test_a_signing_key_is_retrieved_by_its_key_id(viewer_api):
    key = register_key()
    response = viewer_api.get(f"{API}/signing-keys/{key.key_id}/")
    assert response.status_code == 200
    assert response.json()["key_id"] == key.key_id
    assert viewer_api.get(f"{API}/signing-keys/ffffffffffffffff/").status_code == 404


def test_retiring_a_key_is_audited_once_and_a_second_retire_changes_nothing(api):
    key = register_key()
    first = post(api, f"{API}/signing-keys/{key.key_id}/retire/")
    assert first.status_code == 200
    body = first.json()
    assert (body["active"], body["accepted"]) == (False, False)
    assert body["retired_at"] is not None
    second = post(api, f"{API}/signing-keys/{key.key_id}/retire/")
    assert second.status_code == 200
    assert second.json()["retired_at"] == body["retired_at"]
    assert audit_actions("signing_key.retire") == [("signing_key.retire", "olga")]


def test_retiring_the_active_key_is_refused_with_what_happens_unless_forced(api):
    key = register_key(active=True)
    refused = post(api, f"{API}/signing-keys/{key.key_id}/retire/")
    assert refused.status_code == 409
    assert refused.json()["detail"] == SIGNING_KEY_IN_USE.format(key_id=key.key_id)
    key.refresh_from_db()
    assert (key.active, key.retired_at) == (True, None)
    assert audit_actions("signing_key.retire") == []
    forced = post(api, f"{API}/signing-keys/{key.key_id}/retire/", {"force": True})
    assert forced.status_code == 200
    assert (forced.json()["active"], forced.json()["accepted"]) == (False, False)


def test_the_once_active_key_retires_without_force_after_another_is_activated(api):
    old = register_key(active=True)
    register_key(active=True)
    response = post(api, f"{API}/signing-keys/{old.key_id}/retire/")
    assert response.status_code == 200
    assert response.json()["retired_at"] is not None


def test_the_accepted_filter_leaves_out_retired_keys(api):
    kept, retired = register_key(), register_key()
    signing_key_retire(key=retired, actor=None)
    assert [row["key_id"] for row in results(api.get(f"{API}/signing-keys/", {"accepted": "true"}))] == [kept.key_id]
    assert [row["key_id"] for row in results(api.get(f"{API}/signing-keys/", {"accepted": "false"}))] == [
        retired.key_id
    ]


def test_the_trusted_keys_are_the_unretired_ones_plus_the_extra_directory(viewer_api, settings, tmp_path):
    kept, retired = register_key(), register_key()
    signing_key_retire(key=retired, actor=None)
    extra = SigningKeyPair.generate()
    (tmp_path / "extra.pem").write_text(extra.public_key_pem)
    settings.OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR = str(tmp_path)
    response = viewer_api.get(f"{API}/signing-keys/trusted/")
    assert response.status_code == 200
    by_id = {row["key_id"]: row for row in response.json()}
    assert set(by_id) == {kept.key_id, extra.key_id}
    assert by_id[extra.key_id]["public_key_pem"] == extra.public_key_pem
    assert by_id[kept.key_id]["algorithm"] == "ed25519"


# Enrollment tokens


def test_creating_a_token_shows_its_secret_once_and_stores_only_its_hash(api):
    response = post(
        api,
        f"{API}/enrollment-tokens/",
        {"name": "edge", "expires_in_seconds": 3600, "max_uses": 3, "labels": {"env": "prod"}, "auto_approve": True},
    )
    assert response.status_code == 201, response.content
    body = response.json()
    secret = body["secret"]
    assert secret.startswith(TOKEN_PREFIX) and secret.startswith(body["prefix"])
    assert len(secret) > len(body["prefix"])
    assert (body["name"], body["max_uses"], body["use_count"], body["labels"], body["auto_approve"]) == (
        "edge",
        3,
        0,
        {"env": "prod"},
        True,
    )
    assert (body["state"], body["created_by"], body["revoked_at"]) == ("active", "olga", None)
    expires_at = parse_datetime(body["expires_at"])
    assert expires_at is not None
    assert abs((expires_at - timezone.now()) - timedelta(hours=1)) < timedelta(minutes=1)

    token = EnrollmentToken.objects.get(pk=body["id"])
    assert token.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    stored = [str(getattr(token, field.attname)) for field in EnrollmentToken._meta.concrete_fields]
    assert not any(secret in value for value in stored)
    # The secret works, so the hash really is of the secret handed out.
    assert enrollment_token_authenticate(secret) == token

    assert secret.encode() not in api.get(f"{API}/enrollment-tokens/").content
    detail = api.get(f"{API}/enrollment-tokens/{token.pk}/")
    assert detail.status_code == 200
    assert "secret" not in detail.json()
    assert secret.encode() not in detail.content
    assert secret.encode() not in api.get(f"{API}/audit/").content
    # Nor is the stored hash handed out.
    assert token.token_hash.encode() not in detail.content + response.content

    created = AuditEvent.objects.get(action="enrollment_token.create")
    assert created.actor.username == "olga" and created.details["prefix"] == token.prefix


def test_a_token_may_expire_at_a_given_moment(api):
    moment = (timezone.now() + timedelta(days=2)).replace(microsecond=0)
    response = post(api, f"{API}/enrollment-tokens/", {"name": "dc2", "expires_at": moment.isoformat(), "max_uses": 1})
    assert response.status_code == 201, response.content
    expires_at = parse_datetime(response.json()["expires_at"])
    assert expires_at is not None and abs(expires_at - moment) < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"name": "x", "max_uses": 1}, "expires_in_seconds", EXPIRY_NEEDED),
        (
            {"name": "x", "max_uses": 1, "expires_in_seconds": 60, "expires_at": "2099-01-01T00:00:00Z"},
            "expires_in_seconds",
            EXPIRY_NEEDED,
        ),
        ({"name": "x", "max_uses": 1, "expires_at": "2001-01-01T00:00:00Z"}, "expires_at", TOKEN_LIFETIME_INVALID),
        ({"name": "x", "max_uses": 0, "expires_in_seconds": 60}, "max_uses", None),
        ({"name": "x", "max_uses": 1, "expires_in_seconds": 0}, "expires_in_seconds", None),
        ({"name": "", "max_uses": 1, "expires_in_seconds": 60}, "name", None),
        ({"name": "x", "max_uses": 1, "expires_in_seconds": 60, "max_use": 2}, "max_use", "unknown field"),
    ],
)
def test_token_input_is_validated_with_clear_messages(api, body, field, message):
    response = post(api, f"{API}/enrollment-tokens/", body)
    assert response.status_code == 400
    errors = response.json()
    assert field in errors
    if message is not None:
        assert errors[field] == [message]
    assert not EnrollmentToken.objects.exists()
    assert not AuditEvent.objects.filter(action="enrollment_token.create").exists()


def test_token_labels_are_checked_by_the_service(api):
    response = post(
        api, f"{API}/enrollment-tokens/", {"name": "x", "max_uses": 1, "expires_in_seconds": 60, "labels": {"env": 3}}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "labels"
    assert "'env'" in body["detail"] and "must be a string" in body["detail"]
    assert not EnrollmentToken.objects.exists()


def test_revoking_a_token_is_idempotent_and_audited_once(api):
    token, _ = create_token()
    first = post(api, f"{API}/enrollment-tokens/{token.pk}/revoke/")
    assert first.status_code == 200
    assert first.json()["state"] == "revoked" and first.json()["revoked_at"] is not None
    second = post(api, f"{API}/enrollment-tokens/{token.pk}/revoke/")
    assert second.status_code == 200
    assert second.json()["revoked_at"] == first.json()["revoked_at"]
    assert audit_actions("enrollment_token.revoke") == [("enrollment_token.revoke", "olga")]
    assert post(api, f"{API}/enrollment-tokens/999999/revoke/").status_code == 404


def test_the_token_state_is_derived_and_filterable(viewer_api):
    create_token(name="active")
    expired, _ = create_token(name="expired")
    exhausted, _ = create_token(name="exhausted", max_uses=2)
    revoked, _ = create_token(name="revoked")
    past = timezone.now() - timedelta(seconds=1)
    EnrollmentToken.objects.filter(pk=exhausted.pk).update(use_count=2)
    # Revoked wins over expired, and expired over exhausted: the refusal an agent would get.
    EnrollmentToken.objects.filter(pk=expired.pk).update(expires_at=past, use_count=5)
    enrollment_token_revoke(token=revoked, actor=None)
    EnrollmentToken.objects.filter(pk=revoked.pk).update(expires_at=past, use_count=5)

    states = {row["name"]: row["state"] for row in results(viewer_api.get(f"{API}/enrollment-tokens/"))}
    assert states == {"active": "active", "expired": "expired", "exhausted": "exhausted", "revoked": "revoked"}
    for state in states.values():
        rows = results(viewer_api.get(f"{API}/enrollment-tokens/", {"state": state}))
        assert [row["name"] for row in rows] == [state]
    assert viewer_api.get(f"{API}/enrollment-tokens/", {"state": "sleeping"}).status_code == 400


def test_lists_are_paginated(viewer_api):
    for number in range(3):
        create_token(name=f"token {number}")
    response = viewer_api.get(f"{API}/enrollment-tokens/", {"limit": 2})
    body = response.json()
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"]
    assert [row["name"] for row in body["results"]] == ["token 2", "token 1"]


# Certificate requests


def test_the_queue_filters_by_state_and_agent(viewer_api, configured_ca):
    waiting_uid, done_uid = uuid7(), uuid7()
    waiting = submit(waiting_uid)
    done = submit(done_uid, auto_approve=True)
    pending = results(viewer_api.get(f"{API}/certificate-requests/", {"state": "pending"}))
    assert [row["id"] for row in pending] == [waiting.pk]
    assert pending[0]["instance_uid"] == str(waiting_uid)
    assert "csr_pem" not in pending[0]
    issued_rows = results(viewer_api.get(f"{API}/certificate-requests/", {"state": "issued"}))
    assert [row["id"] for row in issued_rows] == [done.pk]
    assert issued_rows[0]["certificate"] == done.certificate.pk
    by_agent = results(viewer_api.get(f"{API}/certificate-requests/", {"instance_uid": str(done_uid)}))
    assert [row["id"] for row in by_agent] == [done.pk]
    assert viewer_api.get(f"{API}/certificate-requests/", {"state": "maybe"}).status_code == 400
    assert viewer_api.get(f"{API}/certificate-requests/", {"instance_uid": "not-a-uid"}).status_code == 400


def test_a_request_shows_its_csr_and_the_token_it_came_with(viewer_api, configured_ca):
    token, _ = create_token(name="rack 7")
    request = submit(kind="p256", token=token)
    response = viewer_api.get(f"{API}/certificate-requests/{request.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["csr_pem"] == request.csr_pem and body["csr_pem"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert (body["state"], body["key_type"], body["certificate"], body["decided_by"]) == (
        "pending",
        "ecdsa-p256",
        None,
        None,
    )
    assert body["enrollment_token"] == {"id": token.pk, "name": "rack 7", "prefix": token.prefix}


def test_an_operator_approval_issues_the_certificate_and_a_second_approval_is_a_409(api, configured_ca):
    request = submit()
    response = post(api, f"{API}/certificate-requests/{request.pk}/approve/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["state"], body["decided_by"]) == ("issued", "olga")
    certificate = IssuedCertificate.objects.get(request=request)
    assert body["certificate"] == certificate.pk and body["decided_at"] is not None

    again = post(api, f"{API}/certificate-requests/{request.pk}/approve/")
    assert again.status_code == 409
    assert again.json()["detail"] == REQUEST_NOT_PENDING.format(pk=request.pk, state="issued")
    assert IssuedCertificate.objects.filter(instance_uid=request.instance_uid).count() == 1
    assert audit_actions("certificate_request.approve") == [("certificate_request.approve", "olga")]
    assert audit_actions("certificate.issue") == [("certificate.issue", "olga")]


def test_a_rejection_needs_a_reason_and_is_final(api, configured_ca):
    request = submit()
    missing = post(api, f"{API}/certificate-requests/{request.pk}/reject/")
    assert missing.status_code == 400 and "reason" in missing.json()
    request.refresh_from_db()
    assert request.state == State.PENDING

    response = post(api, f"{API}/certificate-requests/{request.pk}/reject/", {"reason": "unknown host"})
    assert response.status_code == 200
    assert (response.json()["state"], response.json()["reason"], response.json()["decided_by"]) == (
        "rejected",
        "unknown host",
        "olga",
    )
    for verb, body in (("reject", {"reason": "again"}), ("approve", {})):
        again = post(api, f"{API}/certificate-requests/{request.pk}/{verb}/", body)
        assert again.status_code == 409, verb
        assert again.json()["detail"] == REQUEST_NOT_PENDING.format(pk=request.pk, state="rejected")
    request.refresh_from_db()
    assert request.reason == "unknown host"
    assert not IssuedCertificate.objects.exists()
    assert audit_actions("certificate_request.reject") == [("certificate_request.reject", "olga")]


def test_approving_a_csr_that_no_longer_passes_rejects_it_with_the_reason(api, configured_ca):
    request = submit()
    CertificateRequest.objects.filter(pk=request.pk).update(
        csr_pem=with_broken_signature(request.csr_pem.encode()).decode()
    )
    response = post(api, f"{API}/certificate-requests/{request.pk}/approve/")
    assert response.status_code == 409
    assert response.json()["detail"] == CSR_NO_LONGER_PASSES.format(pk=request.pk, reason=CSR_BAD_SIGNATURE)
    assert response.json()["field"] == "csr"
    request.refresh_from_db()
    assert (request.state, request.reason) == (State.REJECTED, CSR_BAD_SIGNATURE)
    assert not IssuedCertificate.objects.exists()
    assert audit_actions("certificate_request.reject") == [("certificate_request.reject", "olga")]


def test_approving_without_a_ca_is_refused_and_the_request_stays_pending(api, configured_ca, settings):
    request = submit()
    settings.OPAMP_CA_KEY_FILE = ""
    reset_file_cache()
    response = post(api, f"{API}/certificate-requests/{request.pk}/approve/")
    assert response.status_code == 503
    assert response.json()["detail"] == CA_NOT_CONFIGURED
    request.refresh_from_db()
    assert request.state == State.PENDING


# Certificates


def test_certificates_filter_by_agent_revocation_and_expiry(viewer_api, configured_ca):
    kept_uid = uuid7()
    kept, revoked, soon = issued(kept_uid), issued(), issued()
    certificate_revoke(certificate=revoked, actor=None)
    IssuedCertificate.objects.filter(pk=soon.pk).update(not_after=timezone.now() + timedelta(days=3))

    def ids(**query: Any) -> set[int]:
        return {row["id"] for row in results(viewer_api.get(f"{API}/certificates/", query))}

    assert ids() == {kept.pk, revoked.pk, soon.pk}
    assert ids(instance_uid=str(kept_uid)) == {kept.pk}
    assert ids(revoked="true") == {revoked.pk}
    assert ids(revoked="false") == {kept.pk, soon.pk}
    assert ids(expiring_within_days=7) == {soon.pk}
    assert ids(expiring_within_days=7, revoked="true") == set()
    assert viewer_api.get(f"{API}/certificates/", {"expiring_within_days": -1}).status_code == 400
    assert viewer_api.get(f"{API}/certificates/", {"expiring_within_days": "soon"}).status_code == 400


def test_a_certificate_is_shown_with_its_pem_and_renewal_hint(viewer_api, configured_ca):
    certificate = issued()
    listed = results(viewer_api.get(f"{API}/certificates/"))[0]
    assert "pem" not in listed
    response = viewer_api.get(f"{API}/certificates/{certificate.pk}/")
    assert response.status_code == 200
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["pem"].encode())
    assert int(body["serial"], 16) == cert.serial_number == certificate.serial
    assert body["fingerprint_sha256"] == certificate.fingerprint_sha256
    assert body["subject"] == certificate.subject and body["instance_uid"] == str(certificate.instance_uid)
    assert body["ca_fingerprint_sha256"] == configured_ca.ca.fingerprint_sha256
    assert (body["needs_renewal"], body["revoked_at"], body["revocation_reason"]) == (False, None, "")

    # A month of validity with one day left: less than a third remains.
    now = timezone.now()
    IssuedCertificate.objects.filter(pk=certificate.pk).update(
        not_before=now - timedelta(days=29), not_after=now + timedelta(days=1)
    )
    assert viewer_api.get(f"{API}/certificates/{certificate.pk}/").json()["needs_renewal"] is True


def test_revoking_needs_a_known_reason(api, configured_ca):
    certificate = issued()
    response = post(api, f"{API}/certificates/{certificate.pk}/revoke/", {"reason": "lost"})
    assert response.status_code == 400
    assert response.json() == {"reason": [REVOCATION_REASON_INVALID]}
    assert "key_compromise" in REVOCATION_REASON_INVALID
    certificate.refresh_from_db()
    assert certificate.revoked_at is None


def test_revoking_a_certificate_is_idempotent_and_keeps_the_first_reason(api, configured_ca):
    certificate = issued()
    first = post(api, f"{API}/certificates/{certificate.pk}/revoke/", {"reason": "key_compromise"})
    assert first.status_code == 200
    assert first.json()["revocation_reason"] == "key_compromise" and first.json()["revoked_at"] is not None
    second = post(api, f"{API}/certificates/{certificate.pk}/revoke/", {"reason": "superseded"})
    assert second.status_code == 200
    assert (second.json()["revocation_reason"], second.json()["revoked_at"]) == (
        "key_compromise",
        first.json()["revoked_at"],
    )
    assert audit_actions("certificate.revoke") == [("certificate.revoke", "olga")]


def test_revoking_without_a_reason_records_unspecified(api, configured_ca):
    certificate = issued()
    response = post(api, f"{API}/certificates/{certificate.pk}/revoke/")
    assert response.status_code == 200
    assert response.json()["revocation_reason"] == "unspecified"


# The CA and the CRL


def test_without_a_ca_both_endpoints_answer_404_in_json(viewer_api, settings):
    settings.OPAMP_CA_KEY_FILE = settings.OPAMP_CA_CERT_FILE = ""
    for url in ("/ca/", "/ca/crl/", "/ca/crl/?format=pem"):
        response = viewer_api.get(API + url)
        assert response.status_code == 404, url
        assert response["Content-Type"].startswith("application/json")
        assert response.json()["detail"] == CA_NOT_CONFIGURED


def test_the_ca_endpoint_gives_the_certificate_and_its_fingerprint(viewer_api, configured_ca):
    response = viewer_api.get(f"{API}/ca/")
    assert response.status_code == 200
    body = response.json()
    assert body["certificate_pem"] == configured_ca.ca.cert_pem
    assert body["fingerprint_sha256"] == configured_ca.ca.fingerprint_sha256
    assert body["subject"] == "CN=Test agent CA"
    assert PRIVATE_MARKER not in response.content
    # The key file next to it does hold one: the marker check above can fail.
    assert PRIVATE_MARKER in configured_ca.key_file.read_bytes()


def test_the_crl_is_der_by_default_signed_by_the_ca_and_lists_revoked_certificates(viewer_api, configured_ca):
    revoked, valid = issued(), issued()
    certificate_revoke(certificate=revoked, actor=None, reason="key_compromise")
    response = viewer_api.get(f"{API}/ca/crl/")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.content)
    assert crl.is_signature_valid(configured_ca.ca.cert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(valid.serial) is None


@pytest.mark.parametrize(
    "request_kwargs", [{"data": {"format": "pem"}}, {"HTTP_ACCEPT": "application/x-pem-file"}], ids=["query", "accept"]
)
def test_the_crl_comes_as_pem_when_asked(viewer_api, configured_ca, request_kwargs):
    revoked = issued()
    certificate_revoke(certificate=revoked, actor=None)
    response = viewer_api.get(f"{API}/ca/crl/", **request_kwargs)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-pem-file"
    assert response.content.startswith(b"-----BEGIN X509 CRL-----")
    crl = x509.load_pem_x509_crl(response.content)
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial) is not None


def test_an_unknown_crl_format_is_a_clear_400(viewer_api, configured_ca):
    response = viewer_api.get(f"{API}/ca/crl/", {"format": "xml"})
    assert response.status_code == 400
    assert response.json()["detail"] == CRL_FORMAT_UNKNOWN


# No private material, anywhere


def test_no_answer_carries_private_key_material(api, configured_ca, settings, tmp_path):
    key_file = tmp_path / "signing.key"
    generate_signing_key(key_file)
    settings.OPAMP_SIGNING_KEY_FILE = str(key_file)
    key = signing_key_register_active()
    assert key is not None and PRIVATE_MARKER in key_file.read_bytes()
    token, _ = create_token()
    pending = submit(kind="rsa2048")
    certificate = issued()
    created = post(api, f"{API}/enrollment-tokens/", {"name": "sweep", "expires_in_seconds": 60, "max_uses": 1})
    approved = submit()
    answers = [
        created,
        post(api, f"{API}/certificate-requests/{approved.pk}/approve/"),
        post(api, f"{API}/certificates/{certificate.pk}/revoke/", {"reason": "superseded"}),
        post(api, f"{API}/signing-keys/{key.key_id}/retire/", {"force": True}),
    ]
    for url in [
        "/signing-keys/",
        f"/signing-keys/{key.key_id}/",
        "/signing-keys/trusted/",
        "/enrollment-tokens/",
        f"/enrollment-tokens/{token.pk}/",
        "/certificate-requests/",
        f"/certificate-requests/{pending.pk}/",
        f"/certificate-requests/{approved.pk}/",
        "/certificates/",
        f"/certificates/{certificate.pk}/",
        "/ca/",
        "/ca/crl/",
        "/ca/crl/?format=pem",
        "/audit/",
    ]:
        answers.append(api.get(API + url))
    for response in answers:
        assert response.status_code in (200, 201), (response.request["PATH_INFO"], response.content)
        assert PRIVATE_MARKER not in response.content, response.request["PATH_INFO"]


# The schema


def test_the_schema_lists_the_signing_endpoints(api):
    response = api.get(f"{API}/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"get"} <= set(paths["/api/v1/signing-keys/"])
    assert "post" in paths["/api/v1/signing-keys/{key_id}/retire/"]
    assert {"get", "post"} <= set(paths["/api/v1/enrollment-tokens/"])
    assert "post" in paths["/api/v1/enrollment-tokens/{id}/revoke/"]
    for verb in ("approve", "reject"):
        assert "post" in paths[f"/api/v1/certificate-requests/{{id}}/{verb}/"]
    assert "post" in paths["/api/v1/certificates/{id}/revoke/"]
    assert set(paths["/api/v1/ca/crl/"]["get"]["responses"]["200"]["content"]) == {
        "application/pkix-crl",
        "application/x-pem-file",
    }
    query = {p["name"] for p in paths["/api/v1/certificates/"]["get"]["parameters"]}
    assert {"instance_uid", "revoked", "expiring_within_days", "limit", "offset"} <= query
