"""CSR checks and issuance: policy decides the certificate, never the CSR (pure, no database)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signing.ca import (
    CA_CANNOT_SIGN_CERTIFICATES,
    CA_KEY_MISMATCH,
    CA_NOT_A_CA,
    CSR_BAD_SIGNATURE,
    CSR_EXTENSIONS_INVALID,
    CSR_KEY_TYPE_NOT_ALLOWED,
    CSR_NOT_PEM,
    CSR_OTHER_AGENT,
    CSR_REQUESTS_CA,
    CSR_SUBJECT_ALT_NAMES,
    CSR_TOO_LARGE,
    CSR_UNKNOWN_CRITICAL_EXTENSION,
    CaInvalid,
    CsrRejected,
    LoadedCa,
    build_crl,
    check_csr,
    create_ca,
    issue_certificate,
    needs_renewal,
    validate_ca,
)
from tests.signing.csrs import UNKNOWN_EXTENSION_OID, key, make_csr, urn, with_broken_signature

SENDER = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
OTHER = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8058")

REJECTED: list[tuple[str, Callable[[], bytes], str]] = [
    ("not PEM at all", lambda: b"hello", CSR_NOT_PEM),
    ("larger than the cap", lambda: b"A" * 20000, CSR_TOO_LARGE),
    ("a bad signature", lambda: with_broken_signature(make_csr(common_name=str(SENDER))), CSR_BAD_SIGNATURE),
    (
        "a bad signature on a CSR that also asks for CA:true (the signature is checked first)",
        lambda: with_broken_signature(make_csr(ca=True)),
        CSR_BAD_SIGNATURE,
    ),
    ("an RSA-1024 key", lambda: make_csr("rsa1024"), CSR_KEY_TYPE_NOT_ALLOWED.format(key_type="rsa-1024")),
    ("a P-521 key", lambda: make_csr("p521"), CSR_KEY_TYPE_NOT_ALLOWED.format(key_type="ecdsa-secp521r1")),
    ("CA:true", lambda: make_csr(ca=True), CSR_REQUESTS_CA),
    ("an extension that does not parse", lambda: make_csr(garbled_basic_constraints=True), CSR_EXTENSIONS_INVALID),
    (
        "an unknown critical extension",
        lambda: make_csr(unknown_critical_extension=True),
        CSR_UNKNOWN_CRITICAL_EXTENSION.format(oid=UNKNOWN_EXTENSION_OID.dotted_string),
    ),
    ("another agent's uid as CN", lambda: make_csr(common_name=str(OTHER)), CSR_OTHER_AGENT),
    ("another agent's uid as CN in urn form", lambda: make_csr(common_name=urn(OTHER).value), CSR_OTHER_AGENT),
    ("another agent's uid as UID attribute", lambda: make_csr(uid_attribute=OTHER.hex), CSR_OTHER_AGENT),
    ("another agent's uid as SAN URI", lambda: make_csr(sans=[urn(OTHER)]), CSR_OTHER_AGENT),
    ("a DNS SAN", lambda: make_csr(sans=[x509.DNSName("collector.example.com")]), CSR_SUBJECT_ALT_NAMES),
    (
        "a DNS SAN next to the sender's own URI",
        lambda: make_csr(sans=[urn(SENDER), x509.DNSName("x.example")]),
        CSR_SUBJECT_ALT_NAMES,
    ),
    ("an e-mail SAN", lambda: make_csr(sans=[x509.RFC822Name("a@example.com")]), CSR_SUBJECT_ALT_NAMES),
    ("a non-uuid URI SAN", lambda: make_csr(sans=[x509.UniformResourceIdentifier("https://x")]), CSR_SUBJECT_ALT_NAMES),
]


@pytest.mark.parametrize(("case", "build", "message"), REJECTED, ids=[case for case, _, _ in REJECTED])
def test_a_csr_with_a_policy_violation_is_rejected_with_its_message(case, build, message):
    with pytest.raises(CsrRejected) as rejected:
        check_csr(build(), instance_uid=SENDER)
    assert rejected.value.message == message


ACCEPTED: list[tuple[str, Callable[[], bytes], str]] = [
    ("an Ed25519 key naming the sender", lambda: make_csr(common_name=str(SENDER)), "ed25519"),
    ("an ECDSA P-256 key with an empty subject", lambda: make_csr("p256"), "ecdsa-p256"),
    ("an ECDSA P-384 key", lambda: make_csr("p384"), "ecdsa-p384"),
    ("an RSA-2048 key", lambda: make_csr("rsa2048"), "rsa-2048"),
    ("the sender's own urn:uuid SAN", lambda: make_csr(sans=[urn(SENDER)]), "ed25519"),
    ("a CN that is no uid", lambda: make_csr(common_name="edge-collector"), "ed25519"),
    (
        "an unknown extension that is not critical",
        lambda: make_csr(unknown_critical_extension=True, unknown_extension_critical=False),
        "ed25519",
    ),
]


@pytest.mark.parametrize(("case", "build", "key_type"), ACCEPTED, ids=[case for case, _, _ in ACCEPTED])
def test_a_csr_within_policy_is_accepted(case, build, key_type):
    checked = check_csr(build(), instance_uid=SENDER)
    assert checked.instance_uid == SENDER
    assert checked.key_type == key_type


@pytest.fixture(scope="module")
def ca():
    return create_ca(common_name="Test agent CA", days=365)


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_the_issued_certificate_is_built_from_policy_not_from_the_csr(ca, kind):
    checked = check_csr(make_csr(kind, common_name="edge-collector"), instance_uid=SENDER)
    now = datetime(2025, 6, 1, tzinfo=UTC)
    cert = issue_certificate(checked, ca_key=ca.key, ca_cert=ca.cert, validity=timedelta(days=365), now=now)

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(SENDER))])
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    extensions = cert.extensions
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"urn:uuid:{SENDER}")]
    basic = extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert usage.key_agreement is (kind == "p256")
    assert cert.serial_number.bit_length() >= 64
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90)
    assert cert.not_valid_before_utc <= now
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(key(kind).public_key())
    )


def test_two_certificates_never_share_a_serial(ca):
    checked = check_csr(make_csr(), instance_uid=SENDER)
    serials = {
        issue_certificate(checked, ca_key=ca.key, ca_cert=ca.cert, validity=timedelta(days=1)).serial_number
        for _ in range(20)
    }
    assert len(serials) == 20


def test_a_certificate_never_outlives_its_ca():
    short_lived = create_ca(common_name="Short CA", days=10)
    checked = check_csr(make_csr(), instance_uid=SENDER)
    cert = issue_certificate(checked, ca_key=short_lived.key, ca_cert=short_lived.cert, validity=timedelta(days=60))
    assert cert.not_valid_after_utc <= short_lived.cert.not_valid_after_utc


def test_an_ed25519_ca_issues_and_signs_crls_too():
    ed_ca = create_ca(common_name="Ed CA", days=30, key_type="ed25519")
    cert = issue_certificate(
        check_csr(make_csr("p256"), instance_uid=SENDER), ca_key=ed_ca.key, ca_cert=ed_ca.cert, validity=timedelta(1)
    )
    cert.verify_directly_issued_by(ed_ca.cert)
    crl = x509.load_pem_x509_crl(
        build_crl([(cert.serial_number, datetime.now(UTC))], ca_key=ed_ca.key, ca_cert=ed_ca.cert, next_update_hours=1)
    )
    assert crl.is_signature_valid(ed_ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


@pytest.mark.parametrize(
    ("elapsed_days", "renew"),
    [(0, False), (59, False), (61, True), (89, True), (120, True)],
)
def test_a_certificate_needs_renewal_once_less_than_a_third_of_its_validity_is_left(elapsed_days, renew):
    start = datetime(2025, 1, 1, tzinfo=UTC)
    moment = start + timedelta(days=elapsed_days)
    assert needs_renewal(not_before=start, not_after=start + timedelta(days=90), now=moment) is renew


def _self_signed_without_key_cert_sign(ca: LoadedCa) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.cert.not_valid_before_utc)
        .not_valid_after(ca.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())
    )


def _leaf(ca: LoadedCa) -> x509.Certificate:
    checked = check_csr(make_csr("p256"), instance_uid=SENDER)
    return issue_certificate(checked, ca_key=ca.key, ca_cert=ca.cert, validity=timedelta(days=1))


UNUSABLE_CAS: list[tuple[str, Callable[[LoadedCa], tuple[object, x509.Certificate]], str]] = [
    ("an end-entity certificate", lambda ca: (key("p256"), _leaf(ca)), CA_NOT_A_CA),
    (
        "a CA without keyCertSign",
        lambda ca: (ca.key, _self_signed_without_key_cert_sign(ca)),
        CA_CANNOT_SIGN_CERTIFICATES,
    ),
    ("a key that is not the certificate's", lambda ca: (key("p256"), ca.cert), CA_KEY_MISMATCH),
]


@pytest.mark.parametrize(("case", "pair", "message"), UNUSABLE_CAS, ids=[case for case, _, _ in UNUSABLE_CAS])
def test_an_unusable_ca_is_refused_with_its_message(ca, case, pair, message):
    ca_key, cert = pair(ca)
    with pytest.raises(CaInvalid) as refused:
        validate_ca(key=ca_key, cert=cert)
    assert str(refused.value) == message
