"""Certificates for the nginx tests, made with the project's CA code (signing/ca.py)."""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signing.ca import LoadedCa, RevokedEntry, build_crl, certificate_pem, check_csr, create_ca, issue_certificate


@dataclass(frozen=True)
class ClientCert:
    """An agent's certificate and key, written to files for an ssl context."""

    cert: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def pem(self) -> str:
        return certificate_pem(self.cert)

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def write_ca_cert(ca: LoadedCa, path: Path) -> Path:
    path.write_text(ca.cert_pem, encoding="ascii")
    return path


def issue_client(
    ca: LoadedCa, directory: Path, name: str, *, now: datetime | None = None, days: int = 30
) -> ClientCert:
    """The way an agent gets its certificate: its own key, a CSR, check_csr, issue_certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    uid = uuid.uuid4()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(uid))]))
        .sign(key, hashes.SHA256())
    )
    checked = check_csr(csr.public_bytes(serialization.Encoding.PEM), instance_uid=uid)
    cert = issue_certificate(checked, ca_key=ca.key, ca_cert=ca.cert, validity=timedelta(days=days), now=now)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_text(certificate_pem(cert), encoding="ascii")
    _write_key(key, key_file)
    return ClientCert(cert=cert, cert_file=cert_file, key_file=key_file)


def issue_server(ca: LoadedCa, directory: Path, *, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A TLS server certificate for `ip`, signed by `ca` (a CA of the test's own)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_text(certificate_pem(cert), encoding="ascii")
    _write_key(key, key_file)
    return cert_file, key_file


def write_crl(ca: LoadedCa, path: Path, revoked: list[ClientCert]) -> Path:
    """Replace the CRL file the way write_crl does: a new file renamed over the old one."""
    now = datetime.now(UTC)
    pem = build_crl(
        [RevokedEntry(serial=client.serial, revoked_at=now) for client in revoked],
        ca_key=ca.key,
        ca_cert=ca.cert,
        next_update_hours=24,
    )
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(pem)
    temporary.replace(path)
    return path


def new_ca(common_name: str) -> LoadedCa:
    return create_ca(common_name=common_name, days=30)
