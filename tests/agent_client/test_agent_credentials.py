"""Keys, CSRs and certificates: built to pass the server's policy, stored 0600, checked before use."""

from __future__ import annotations

import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtensionOID, NameOID

from agent_client.credentials import (
    KEY_TYPES,
    CertificateRefused,
    Credentials,
    CredentialStore,
    PendingRequest,
    SettingsStatus,
    build_csr,
    check_offered_certificate,
    generate_key,
    private_key_pem,
)
from agent_client.state import FileState, StateError
from opamp.identifiers import new_instance_uid
from opamp.proto import opamp_pb2 as pb
from signing.ca import check_csr
from tests.agent_client.pki import issue, issue_unchecked, new_ca, pem


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pending_request(uid: bytes, key_type: str = "ecdsa-p256") -> PendingRequest:
    key = generate_key(key_type)
    return PendingRequest(key=key, csr_pem=build_csr(key, uid))


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize("san", [True, False])
def test_the_csr_passes_the_server_policy_and_names_only_the_agent(key_type: str, san: bool) -> None:
    uid = new_instance_uid()
    key = generate_key(key_type)
    csr_pem = build_csr(key, uid, san=san)

    checked = check_csr(csr_pem, instance_uid=uuid.UUID(bytes=uid))
    assert checked.key_type == key_type
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.subject.rfc4514_string() == f"CN={uuid.UUID(bytes=uid)}"
    extensions = {extension.oid for extension in csr.extensions}
    if san:
        assert extensions == {ExtensionOID.SUBJECT_ALTERNATIVE_NAME}
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(names) == [x509.UniformResourceIdentifier(f"urn:uuid:{uuid.UUID(bytes=uid)}")]
    else:
        assert extensions == set()
    if key_type == "ed25519":
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        assert csr.signature_hash_algorithm is None
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1"}[key_type]
        assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)


def test_an_unknown_key_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported key type"):
        generate_key("rsa-1024")


def test_a_created_state_dir_is_0700_and_every_credential_file_0600(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = CredentialStore(directory)
    assert mode(directory) == 0o700
    uid = new_instance_uid()
    pending = pending_request(uid)
    store.save_pending(pending)
    assert mode(store.pending_key_file) == 0o600
    assert mode(store.pending_csr_file) == 0o600
    loaded_pending = store.load_pending()
    assert loaded_pending is not None
    assert loaded_pending.csr_pem == pending.csr_pem
    assert private_key_pem(loaded_pending.key) == private_key_pem(pending.key)

    ca = new_ca()
    cert = issue(ca, pending.csr_pem, uid)
    installed = store.install(cert=cert, ca_cert=ca.cert, pending=pending)
    for path in (store.key_file, store.cert_file, store.ca_file):
        assert mode(path) == 0o600, path
    assert not store.pending_key_file.exists()
    assert not store.pending_csr_file.exists()
    assert store.key_file.read_bytes() == private_key_pem(pending.key)
    store.save_status(SettingsStatus(last_hash=b"\x01\x02", status=pb.ConnectionSettingsStatuses_APPLIED))
    assert mode(store.status_file) == 0o600

    loaded = store.load_credentials()
    assert loaded is not None
    assert loaded.cert == installed.cert == cert
    assert loaded.ca_cert == ca.cert
    assert store.load_status() == SettingsStatus(last_hash=b"\x01\x02", status=pb.ConnectionSettingsStatuses_APPLIED)


def test_file_state_creates_its_directory_0700(tmp_path: Path) -> None:
    FileState(tmp_path / "fresh")
    assert mode(tmp_path / "fresh") == 0o700


def test_an_install_interrupted_after_the_certificate_is_finished_on_load(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "state")
    uid = new_instance_uid()
    ca = new_ca()
    old = pending_request(uid)
    store.install(cert=issue(ca, old.csr_pem, uid), ca_cert=ca.cert, pending=old)
    renewal = pending_request(uid)
    store.save_pending(renewal)
    new_cert = issue(ca, renewal.csr_pem, uid)
    # The process died right after writing client.crt: client.key is still the old key.
    store.cert_file.write_bytes(pem(new_cert))

    loaded = CredentialStore(tmp_path / "state").load_credentials()
    assert loaded is not None and loaded.cert == new_cert
    assert store.key_file.read_bytes() == private_key_pem(renewal.key)
    assert mode(store.key_file) == 0o600
    assert not store.pending_key_file.exists()


def test_a_certificate_that_belongs_to_no_stored_key_is_a_state_error(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "state")
    uid = new_instance_uid()
    ca = new_ca()
    first, second = pending_request(uid), pending_request(uid)
    store.install(cert=issue(ca, first.csr_pem, uid), ca_cert=ca.cert, pending=first)
    store.cert_file.write_bytes(pem(issue(ca, second.csr_pem, uid)))
    with pytest.raises(StateError, match="does not belong to the key"):
        store.load_credentials()


def test_an_unreadable_key_file_is_a_state_error_that_quotes_no_key_material(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "state")
    uid = new_instance_uid()
    store.save_pending(pending_request(uid))
    store.pending_key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n")
    with pytest.raises(StateError) as caught:
        store.load_pending()
    assert "c2VjcmV0" not in str(caught.value)


# --- checking offers --------------------------------------------------------------------

NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)


def check(cert: x509.Certificate, ca_cert: x509.Certificate, pending: PendingRequest | None, uid: bytes, now=NOW):  # type: ignore[no-untyped-def]
    return check_offered_certificate(
        cert_pem=pem(cert), ca_pem=pem(ca_cert), key=pending.key if pending else None, instance_uid=uid, now=now
    )


def test_a_good_certificate_is_accepted() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = issue(ca, pending.csr_pem, uid, now=NOW)
    assert check(cert, ca.cert, pending, uid) == (cert, ca.cert)


def test_a_certificate_for_another_key_is_refused() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = issue(ca, pending_request(uid).csr_pem, uid, now=NOW)
    with pytest.raises(CertificateRefused, match="not the key of the pending certificate request"):
        check(cert, ca.cert, pending, uid)


def test_a_certificate_naming_another_agent_is_refused() -> None:
    uid, other = new_instance_uid(), uuid.UUID(bytes=new_instance_uid())
    ca = new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    public_key = pending.key.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    cert = issue_unchecked(ca, public_key=public_key, uid=other, now=NOW)
    with pytest.raises(CertificateRefused, match=f"names {other}, not this agent's instance uid"):
        check(cert, ca.cert, pending, uid)


def test_a_certificate_naming_no_uid_is_refused() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nobody")]))
        .issuer_name(ca.cert.subject)
        .public_key(pending.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    with pytest.raises(CertificateRefused, match="names no instance uid"):
        check(cert, ca.cert, pending, uid)


def test_a_certificate_from_another_ca_is_refused() -> None:
    uid = new_instance_uid()
    ca, impostor = new_ca(now=NOW - timedelta(days=1)), new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = issue(impostor, pending.csr_pem, uid, now=NOW)
    with pytest.raises(CertificateRefused, match="not issued by the offered CA: the CA's signature does not verify"):
        check(cert, ca.cert, pending, uid)


def test_a_certificate_whose_issuer_is_not_the_ca_is_refused() -> None:
    uid = new_instance_uid()
    ca, other = new_ca(now=NOW - timedelta(days=1)), new_ca("elsewhere", now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = issue(ca, pending.csr_pem, uid, now=NOW)
    with pytest.raises(CertificateRefused, match="its issuer is not the CA's subject"):
        check(cert, other.cert, pending, uid)


def test_an_expired_certificate_is_refused() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=100))
    pending = pending_request(uid)
    cert = issue(ca, pending.csr_pem, uid, validity=timedelta(days=1), now=NOW - timedelta(days=10))
    with pytest.raises(CertificateRefused, match="expired at"):
        check(cert, ca.cert, pending, uid)


def test_a_certificate_not_valid_yet_is_refused() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = issue(ca, pending.csr_pem, uid, now=NOW + timedelta(days=2))
    with pytest.raises(CertificateRefused, match="not valid yet"):
        check(cert, ca.cert, pending, uid)


def test_a_certificate_without_a_pending_request_is_refused() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    cert = issue(ca, pending_request(uid).csr_pem, uid, now=NOW)
    with pytest.raises(CertificateRefused, match="no certificate request is pending"):
        check(cert, ca.cert, None, uid)


def test_garbage_instead_of_a_certificate_is_refused() -> None:
    uid = new_instance_uid()
    with pytest.raises(CertificateRefused, match=r"not a PEM X\.509 certificate"):
        check_offered_certificate(
            cert_pem=b"not a certificate", ca_pem=b"", key=pending_request(uid).key, instance_uid=uid, now=NOW
        )


def test_an_offer_without_ca_uses_the_stored_ca_or_is_refused() -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    pending = pending_request(uid)
    cert = issue(ca, pending.csr_pem, uid, now=NOW)
    options = {"cert_pem": pem(cert), "ca_pem": b"", "key": pending.key, "instance_uid": uid, "now": NOW}
    with pytest.raises(CertificateRefused, match="no CA certificate"):
        check_offered_certificate(**options)  # type: ignore[arg-type]
    assert check_offered_certificate(**options, stored_ca=ca.cert) == (cert, ca.cert)  # type: ignore[arg-type]


def test_renewal_is_due_once_less_than_a_third_of_the_validity_is_left(tmp_path: Path) -> None:
    uid = new_instance_uid()
    ca = new_ca(now=NOW - timedelta(days=1))
    cert = issue(ca, pending_request(uid).csr_pem, uid, validity=timedelta(days=30), now=NOW)
    credentials = Credentials(cert=cert, cert_file=tmp_path / "c", key_file=tmp_path / "k")
    third = (cert.not_valid_after_utc - cert.not_valid_before_utc) / 3
    mark = cert.not_valid_after_utc - third
    assert credentials.renewal_time() == mark
    assert not credentials.renewal_due(mark - timedelta(seconds=1))
    assert credentials.renewal_due(mark + timedelta(seconds=1))
    assert credentials.renewal_due(cert.not_valid_after_utc + timedelta(days=1))
    assert credentials.names(uid)
    assert not credentials.names(new_instance_uid())
