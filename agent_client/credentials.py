"""The agent's TLS client credentials: key pairs, CSRs, issued certificates and their checks.

Layout under the state directory (every file 0600; the directory 0700 when created here):

    client.key                the private key of the certificate in use (PKCS#8 PEM)
    client.crt                the certificate in use (PEM), issued by the server's agent CA
    ca.crt                    the CA certificate that issued client.crt (PEM)
    pending.key               the private key of a certificate request not yet answered
    pending.csr               that request (PKCS#10 PEM), re-sent unchanged until answered
    connection_settings.json  the last ConnectionSettingsStatus: offer hash, status, error

Installing an issued certificate writes ca.crt, then client.crt, then client.key, then
removes the pending pair. client.crt is the commit point: if the process dies after it and
before client.key, loading finds a certificate that belongs to pending.key and finishes the
install. Key material is never logged; only SHA-256 fingerprints of public keys are.

Pure: the standard library and `cryptography`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent_client.state import StateError, fsync_directory, write_atomically
from opamp.certificates import is_ca_certificate
from opamp.proto import opamp_pb2 as pb

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519")
DEFAULT_KEY_TYPE = "ecdsa-p256"
URN_UUID_PREFIX = "urn:uuid:"

CLIENT_KEY_FILE = "client.key"
CLIENT_CERT_FILE = "client.crt"
CA_CERT_FILE = "ca.crt"
PENDING_KEY_FILE = "pending.key"
PENDING_CSR_FILE = "pending.csr"
STATUS_FILE = "connection_settings.json"
PRIVATE_FILE_MODE = 0o600
DIRECTORY_MODE = 0o700

# Why an offered certificate is refused; reported as the ConnectionSettingsStatus error.
NO_PENDING_REQUEST = "no certificate request is pending, so no key is waiting for this certificate"
CERT_UNREADABLE = "the offered certificate is not a PEM X.509 certificate"
CA_MISSING = "the offer has no CA certificate and none is stored"
CA_UNREADABLE = "the offered CA certificate is not a PEM X.509 certificate"
KEY_MISMATCH = "the certificate's public key is not the key of the pending certificate request"
NAMES_NO_UID = "the certificate names no instance uid (no CN or urn:uuid SAN); expected {uid}"
NAMES_OTHER_UID = "the certificate names {named}, not this agent's instance uid {uid}"
NOT_YET_VALID = "the certificate is not valid yet (valid from {not_before}); check the agent's clock"
EXPIRED = "the certificate expired at {not_after}"
NOT_CLIENT_AUTH = "the certificate's extended key usage does not allow TLS client authentication"
CA_NOT_CA = "the offered CA certificate is not a CA (basicConstraints CA:true is missing)"
CA_NOT_VALID = "the CA certificate is not valid now (valid {not_before} to {not_after})"
NOT_ISSUED_BY_CA = "the certificate was not issued by the offered CA: {reason}"

_STATUS_NAMES = {
    pb.ConnectionSettingsStatuses_UNSET: "UNSET",
    pb.ConnectionSettingsStatuses_APPLIED: "APPLIED",
    pb.ConnectionSettingsStatuses_FAILED: "FAILED",
}
_STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}


class CertificateRefused(ValueError):
    """An offered certificate the agent will not use; `str()` says why (safe to report)."""


# --- keys and requests ------------------------------------------------------------------


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_der(key: PrivateKey | CertificatePublicKeyTypes) -> bytes:
    public = key.public_key() if isinstance(key, PrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_fingerprint(key: PrivateKey | CertificatePublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo (DER), hex: what logs and operators compare."""
    return hashlib.sha256(_public_der(key)).hexdigest()


def build_csr(key: PrivateKey, instance_uid: bytes, *, san: bool = True) -> bytes:
    """A PKCS#10 request (PEM): CN = the canonical instance uid, optionally the SAN
    `urn:uuid:<uid>` and nothing else; SHA-256 for ECDSA, no digest for Ed25519."""
    uid = str(uuid.UUID(bytes=instance_uid))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uid)])
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URN_UUID_PREFIX}{uid}")]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _load_private_key(data: bytes, path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        # Only the error's type: its text could quote key material.
        raise StateError(f"{path}: unreadable private key ({type(error).__name__})") from None
    if not isinstance(key, PrivateKey):
        raise StateError(f"{path}: unsupported private key type {type(key).__name__}")
    return key


def _uid_named(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


def named_uids(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """Every instance uid the subject CN or a `urn:uuid:` SAN names (as written)."""
    names = [str(attribute.value) for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names += [
            uri.removeprefix(URN_UUID_PREFIX)
            for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.startswith(URN_UUID_PREFIX)
        ]
    return names


# --- what the agent holds ---------------------------------------------------------------


@dataclass(frozen=True)
class PendingRequest:
    """A key pair and the CSR sent for it, waiting for a certificate."""

    key: PrivateKey = field(repr=False)
    csr_pem: bytes

    @property
    def fingerprint(self) -> str:
        return public_key_fingerprint(self.key)

    def names(self, instance_uid: bytes) -> bool:
        csr = x509.load_pem_x509_csr(self.csr_pem)
        names = named_uids(csr)
        return bool(names) and all(_uid_named(name) == uuid.UUID(bytes=instance_uid) for name in names)


@dataclass(frozen=True)
class Credentials:
    """The certificate in use, its key's files and the CA that issued it."""

    cert: x509.Certificate
    cert_file: Path
    key_file: Path
    ca_cert: x509.Certificate | None = None

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now <= self.not_after

    def renewal_due(self, now: datetime) -> bool:
        """True once less than a third of the validity is left (or it expired)."""
        return (self.not_after - now) < (self.not_after - self.not_before) / 3

    def renewal_time(self) -> datetime:
        return self.not_after - (self.not_after - self.not_before) / 3

    def names(self, instance_uid: bytes) -> bool:
        names = named_uids(self.cert)
        return bool(names) and all(_uid_named(name) == uuid.UUID(bytes=instance_uid) for name in names)

    def describe(self) -> str:
        return (
            f"serial {format(self.cert.serial_number, 'x')}, valid until {self.not_after.isoformat()}, "
            f"public key sha256 {public_key_fingerprint(self.cert.public_key())[:16]}"
        )


@dataclass(frozen=True)
class SettingsStatus:
    """The ConnectionSettingsStatus the agent reports (persisted across restarts)."""

    last_hash: bytes = b""
    status: pb.ConnectionSettingsStatuses = pb.ConnectionSettingsStatuses_UNSET
    error_message: str = ""

    def to_proto(self) -> pb.ConnectionSettingsStatus:
        return pb.ConnectionSettingsStatus(
            last_connection_settings_hash=self.last_hash, status=self.status, error_message=self.error_message
        )


# --- checking an offered certificate ----------------------------------------------------


def _load_certificate(pem: bytes, problem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateRefused(problem) from None


def check_offered_certificate(
    *,
    cert_pem: bytes,
    ca_pem: bytes,
    key: PrivateKey | None,
    instance_uid: bytes,
    now: datetime,
    stored_ca: x509.Certificate | None = None,
) -> tuple[x509.Certificate, x509.Certificate]:
    """The certificate and its CA if the agent may use them with `key`, else CertificateRefused.

    Checks, in order: a pending key exists; both parse; the certificate's public key is
    `key`'s; the CN and every `urn:uuid:` SAN name `instance_uid`; valid at `now`; the
    extended key usage (when present) allows clientAuth; the CA is a CA, valid at `now`,
    and its signature over the certificate verifies. `stored_ca` stands in for an empty
    `ca_pem` (a renewal from the same CA may omit it).
    """
    if key is None:
        raise CertificateRefused(NO_PENDING_REQUEST)
    cert = _load_certificate(cert_pem, CERT_UNREADABLE)
    if ca_pem.strip():
        ca_cert = _load_certificate(ca_pem, CA_UNREADABLE)
    elif stored_ca is not None:
        ca_cert = stored_ca
    else:
        raise CertificateRefused(CA_MISSING)

    if _public_der(cert.public_key()) != _public_der(key):
        raise CertificateRefused(KEY_MISMATCH)

    uid = str(uuid.UUID(bytes=instance_uid))
    names = named_uids(cert)
    if not names:
        raise CertificateRefused(NAMES_NO_UID.format(uid=uid))
    for name in names:
        if _uid_named(name) != uuid.UUID(uid):
            raise CertificateRefused(NAMES_OTHER_UID.format(named=name[:64], uid=uid))

    if now < cert.not_valid_before_utc:
        raise CertificateRefused(NOT_YET_VALID.format(not_before=cert.not_valid_before_utc.isoformat()))
    if now > cert.not_valid_after_utc:
        raise CertificateRefused(EXPIRED.format(not_after=cert.not_valid_after_utc.isoformat()))
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise CertificateRefused(NOT_CLIENT_AUTH)

    if not is_ca_certificate(ca_cert):
        raise CertificateRefused(CA_NOT_CA)
    if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
        raise CertificateRefused(
            CA_NOT_VALID.format(
                not_before=ca_cert.not_valid_before_utc.isoformat(), not_after=ca_cert.not_valid_after_utc.isoformat()
            )
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except ValueError:
        raise CertificateRefused(NOT_ISSUED_BY_CA.format(reason="its issuer is not the CA's subject")) from None
    except InvalidSignature:
        raise CertificateRefused(NOT_ISSUED_BY_CA.format(reason="the CA's signature does not verify")) from None
    except (TypeError, UnsupportedAlgorithm):
        raise CertificateRefused(NOT_ISSUED_BY_CA.format(reason="unsupported signature algorithm")) from None
    return cert, ca_cert


# --- storage ----------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    # mkstemp already creates the temporary file 0600; the chmod keeps it so whatever
    # the temporary file's origin.
    write_atomically(path, data)
    os.chmod(path, PRIVATE_FILE_MODE)


class CredentialStore:
    """The credential files in one directory (usually the agent's state directory)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        if not self.directory.exists():
            self.directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        self.key_file = self.directory / CLIENT_KEY_FILE
        self.cert_file = self.directory / CLIENT_CERT_FILE
        self.ca_file = self.directory / CA_CERT_FILE
        self.pending_key_file = self.directory / PENDING_KEY_FILE
        self.pending_csr_file = self.directory / PENDING_CSR_FILE
        self.status_file = self.directory / STATUS_FILE

    def holds_credentials(self) -> bool:
        """True when the directory has a certificate or a pending request (the agent enrolled)."""
        return self.cert_file.exists() or self.pending_key_file.exists()

    def loose_permissions(self) -> list[Path]:
        """Key files that other users could read (the agent warns; it does not change them)."""
        loose = []
        for path in (self.key_file, self.pending_key_file):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_IMODE(path.stat().st_mode) & 0o077:
                    loose.append(path)
        return loose

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StateError(f"{path}: unreadable: {error.strerror or error}") from error

    def _read_certificate(self, path: Path) -> x509.Certificate | None:
        data = self._read(path)
        if data is None:
            return None
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise StateError(f"{path}: not a PEM X.509 certificate") from None

    def load_pending(self) -> PendingRequest | None:
        key_data = self._read(self.pending_key_file)
        csr_data = self._read(self.pending_csr_file)
        if key_data is None or csr_data is None:
            return None
        key = _load_private_key(key_data, self.pending_key_file)
        try:
            csr = x509.load_pem_x509_csr(csr_data)
        except ValueError:
            raise StateError(f"{self.pending_csr_file}: not a PEM certificate request") from None
        if _public_der(csr.public_key()) != _public_der(key):
            raise StateError(f"{self.pending_csr_file}: the request is not for the key in {self.pending_key_file}")
        return PendingRequest(key=key, csr_pem=csr_data)

    def save_pending(self, pending: PendingRequest) -> None:
        # Key first: a request whose key is lost is worthless, a key without a request is
        # simply replaced next time.
        _write_private(self.pending_key_file, private_key_pem(pending.key))
        _write_private(self.pending_csr_file, pending.csr_pem)
        fsync_directory(self.directory)

    def discard_pending(self) -> None:
        for path in (self.pending_csr_file, self.pending_key_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_directory(self.directory)

    def load_credentials(self) -> Credentials | None:
        """The certificate in use, finishing an install a crash interrupted; None before enrollment."""
        cert = self._read_certificate(self.cert_file)
        if cert is None:
            return None
        key_data = self._read(self.key_file)
        key = _load_private_key(key_data, self.key_file) if key_data is not None else None
        if key is None or _public_der(key) != _public_der(cert.public_key()):
            pending = self.load_pending()
            if pending is None or _public_der(pending.key) != _public_der(cert.public_key()):
                raise StateError(f"{self.cert_file} does not belong to the key in {self.key_file}")
            # The install stopped after its commit point: finish it.
            _write_private(self.key_file, private_key_pem(pending.key))
            self.discard_pending()
        return Credentials(
            cert=cert, cert_file=self.cert_file, key_file=self.key_file, ca_cert=self._read_certificate(self.ca_file)
        )

    def install(self, *, cert: x509.Certificate, ca_cert: x509.Certificate, pending: PendingRequest) -> Credentials:
        """Make `cert` (for `pending.key`) the certificate in use; see the module doc for the order."""
        encoding = serialization.Encoding.PEM
        _write_private(self.ca_file, ca_cert.public_bytes(encoding))
        _write_private(self.cert_file, cert.public_bytes(encoding))
        fsync_directory(self.directory)
        _write_private(self.key_file, private_key_pem(pending.key))
        self.discard_pending()
        return Credentials(cert=cert, cert_file=self.cert_file, key_file=self.key_file, ca_cert=ca_cert)

    def load_status(self) -> SettingsStatus:
        data = self._read(self.status_file)
        if data is None:
            return SettingsStatus()
        try:
            document = json.loads(data)
            return SettingsStatus(
                last_hash=bytes.fromhex(document["last_connection_settings_hash"]),
                status=_STATUS_VALUES[document["status"]],
                error_message=str(document["error_message"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise StateError(f"{self.status_file}: malformed connection settings status: {error!r}") from error

    def save_status(self, status: SettingsStatus) -> None:
        name = _STATUS_NAMES.get(status.status)
        if name is None:
            raise ValueError(f"only terminal statuses are persisted, not {status.status}")
        document = {
            "last_connection_settings_hash": status.last_hash.hex(),
            "status": name,
            "error_message": status.error_message,
        }
        _write_private(self.status_file, json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n")
        fsync_directory(self.directory)
