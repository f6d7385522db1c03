"""The CA commands, the CRL command, and the admin's actions and one-time secret."""

from __future__ import annotations

import stat
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from opamp.identifiers import uuid7
from signing.ca import CA_NOT_A_CA, check_csr, create_ca, issue_certificate, write_ca
from signing.certificates import certificate_request_submit, certificate_revoke
from signing.config_signing import SigningKeyPair, private_key_pem_pkcs8
from signing.enrollment_tokens import enrollment_token_authenticate, enrollment_token_create
from signing.errors import SIGNING_KEY_IN_USE
from signing.models import CertificateAuthority, CertificateRequest, EnrollmentToken, IssuedCertificate
from signing.signing_keys import signing_key_register
from tests.signing.csrs import key, make_csr

pytestmark = pytest.mark.django_db


def test_create_ca_writes_a_private_key_file_and_registers_only_the_certificate(tmp_path, capsys):
    key_file, cert_file = tmp_path / "ca.key", tmp_path / "ca.pem"
    call_command("create_ca", "--key-file", str(key_file), "--cert-file", str(cert_file), "--common-name", "Fleet CA")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    authority = CertificateAuthority.objects.get()
    assert authority.subject == "CN=Fleet CA"
    assert "PRIVATE" not in authority.certificate_pem
    assert f"OPAMP_CA_KEY_FILE={key_file}" in capsys.readouterr().out


def test_create_ca_never_overwrites_existing_files(tmp_path):
    (tmp_path / "ca.key").write_text("keep")
    with pytest.raises(CommandError):
        call_command("create_ca", "--key-file", str(tmp_path / "ca.key"), "--cert-file", str(tmp_path / "ca.pem"))
    assert (tmp_path / "ca.key").read_text() == "keep"
    assert not (tmp_path / "ca.pem").exists()


def test_import_ca_accepts_a_real_ca(tmp_path):
    write_ca(create_ca(common_name="Imported", days=30), key_file=tmp_path / "k", cert_file=tmp_path / "c")
    call_command("import_ca", "--key-file", str(tmp_path / "k"), "--cert-file", str(tmp_path / "c"))
    assert CertificateAuthority.objects.get().subject == "CN=Imported"


def test_import_ca_refuses_an_end_entity_certificate(tmp_path, ca_files):
    leaf = issue_certificate(
        check_csr(make_csr("p256"), instance_uid=uuid7()),
        ca_key=ca_files.ca.key,
        ca_cert=ca_files.ca.cert,
        validity=timedelta(days=1),
    )
    (tmp_path / "leaf.key").write_bytes(private_key_pem_pkcs8(key("p256")))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CommandError) as refused:
        call_command("import_ca", "--key-file", str(tmp_path / "leaf.key"), "--cert-file", str(tmp_path / "leaf.pem"))
    assert str(refused.value) == CA_NOT_A_CA
    assert not CertificateAuthority.objects.exists()


def test_write_crl_replaces_the_file_with_a_signed_crl(configured_ca, tmp_path, operator):
    certificate = certificate_request_submit(instance_uid=uuid7(), csr_pem=make_csr(), auto_approve=True).certificate
    certificate_revoke(certificate=certificate, actor=operator)
    output = tmp_path / "agents.crl"
    output.write_text("old")
    call_command("write_crl", "--output", str(output))
    crl = x509.load_pem_x509_crl(output.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(certificate.serial) is not None


def test_create_enrollment_token_prints_the_secret_once_and_stores_its_hash(capsys):
    call_command("create_enrollment_token", "--name", "lab", "--max-uses", "5", "--label", "env=lab")
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    token = enrollment_token_authenticate(secret)
    assert (token.name, token.max_uses, token.labels) == ("lab", 5, {"env": "lab"})


@pytest.fixture
def admin_client(operator) -> Client:
    client = Client()
    client.force_login(operator)
    return client


def test_the_admin_creates_a_token_and_shows_its_secret_once(admin_client):
    response = admin_client.post(
        "/admin/signing/enrollmenttoken/add/",
        {"name": "lab", "expires_in_hours": "2", "max_uses": "4", "labels": '{"env": "lab"}', "auto_approve": "on"},
        follow=True,
    )
    assert response.status_code == 200
    token = EnrollmentToken.objects.get()
    shown = [str(message) for message in response.context["messages"]]
    secret_messages = [text for text in shown if "<code>" in text]
    assert len(secret_messages) == 1
    secret = secret_messages[0].split("<code>")[1].split("</code>")[0]
    assert enrollment_token_authenticate(secret) == token
    assert (token.max_uses, token.labels, token.auto_approve) == (4, {"env": "lab"}, True)
    again = admin_client.get(f"/admin/signing/enrollmenttoken/{token.pk}/change/")
    assert secret.encode() not in again.content


def test_the_admin_refuses_invalid_token_labels(admin_client):
    response = admin_client.post(
        "/admin/signing/enrollmenttoken/add/",
        {"name": "lab", "expires_in_hours": "2", "max_uses": "1", "labels": '{"bad key": "x"}'},
    )
    assert response.status_code == 200
    assert not EnrollmentToken.objects.exists()


def test_the_admin_approves_and_revokes_through_the_services(admin_client, configured_ca):
    request = certificate_request_submit(instance_uid=uuid7(), csr_pem=make_csr(), auto_approve=False)
    answer = admin_client.post(
        "/admin/signing/certificaterequest/", {"action": "approve", "_selected_action": [request.pk]}, follow=True
    )
    request.refresh_from_db()
    assert request.state == CertificateRequest.State.ISSUED
    assert (
        b"1 request(s) approved; 0 rejected because the CSR no longer passes the policy; 0 were no longer pending."
        in (answer.content)
    )
    certificate = IssuedCertificate.objects.get()
    admin_client.post(
        "/admin/signing/issuedcertificate/",
        {"action": "revoke_key_compromise", "_selected_action": [certificate.pk]},
        follow=True,
    )
    certificate.refresh_from_db()
    assert certificate.revocation_reason == "key_compromise"
    page = admin_client.get(f"/admin/signing/certificaterequest/{request.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content


def test_every_signing_admin_page_renders(admin_client, configured_ca):
    certificate_request_submit(instance_uid=uuid7(), csr_pem=make_csr(), auto_approve=True)
    enrollment_token_create(
        name="t", expires_in=timedelta(hours=1), max_uses=1, labels={}, auto_approve=False, actor=None
    )
    for model in ["signingkey", "certificateauthority", "certificaterequest", "issuedcertificate", "enrollmenttoken"]:
        assert admin_client.get(f"/admin/signing/{model}/").status_code == 200


def test_the_admin_refuses_to_retire_the_active_key_and_says_why(admin_client):
    key = signing_key_register(public_key_pem=SigningKeyPair.generate().public_key_pem, actor=None, active=True)
    answer = admin_client.post(
        "/admin/signing/signingkey/", {"action": "retire", "_selected_action": [key.pk]}, follow=True
    )
    assert SIGNING_KEY_IN_USE.format(key_id=key.key_id) in [str(m) for m in answer.context["messages"]]
    key.refresh_from_db()
    assert key.retired_at is None
