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

from signing.ca import (
    LoadedCa,
    RevokedEntry,
    build_crl,
    certificate_pem,
    check_csr,
    create_ca,
    issue_certificate,
    write_ca,
)


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


@dataclass(frozen=True)
class FrontFiles:
    """What a server behind nginx needs: the agents' CA (the project's, key and certificate)
    with the path of its CRL, and a separate CA with nginx's server certificate for 127.0.0.1."""

    agents_ca: LoadedCa
    ca_key: Path
    ca_cert: Path
    crl: Path  # written by the server's `manage.py write_crl`; nginx will not start without it
    server_cert: Path
    server_key: Path
    server_ca: Path  # what clients verify nginx with

    def server_env(self) -> dict[str, str]:
        """The server's settings for these files, nginx on loopback being its trusted proxy."""
        return {
            "OPAMP_TRUSTED_PROXIES": "127.0.0.1",
            "OPAMP_CA_KEY_FILE": str(self.ca_key),
            "OPAMP_CA_CERT_FILE": str(self.ca_cert),
            "OPAMP_CRL_FILE": str(self.crl),
        }


def front_files(directory: Path, name: str) -> FrontFiles:
    agents_ca = new_ca(f"{name} agents CA")
    write_ca(agents_ca, key_file=directory / "ca.key", cert_file=directory / "ca.pem")
    tls_ca = new_ca(f"{name} TLS CA")
    (directory / "tls").mkdir()
    (directory / "crl").mkdir()
    server_cert, server_key = issue_server(tls_ca, directory / "tls")
    return FrontFiles(
        agents_ca=agents_ca,
        ca_key=directory / "ca.key",
        ca_cert=directory / "ca.pem",
        crl=directory / "crl" / "agents.crl.pem",
        server_cert=server_cert,
        server_key=server_key,
        server_ca=write_ca_cert(tls_ca, directory / "tls" / "server-ca.pem"),
    )
