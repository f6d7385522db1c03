"""The agents' certificate authority: CA creation and validation, CSR checks, issuance, CRLs.

Pure (standard library and `cryptography`). The one rule everything here follows: the
server's policy decides what a certificate says, never the CSR. A CSR contributes only its
public key, and only after its own signature verified; the subject, the names, the usages
and the validity come from the authenticated instance uid and the settings.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from opamp.certificates import is_ca_certificate
from opamp.config_signature import SigningKeyError
from signing.config_signing import private_key_pem_pkcs8, write_new_private_file

CaPrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
AgentPublicKey: TypeAlias = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# A CSR is well under 4 KiB even with RSA-8192; a bigger one is refused unparsed.
MAX_CSR_BYTES = 16 * 1024
_PEM_TEXT = re.compile(rb"[\x20-\x7e\t\r\n]*")
MIN_RSA_BITS = 2048
# Verifying huge RSA signatures costs CPU an agent could make us spend on purpose.
MAX_RSA_BITS = 8192
ALLOWED_CURVES = {"secp256r1": "p256", "secp384r1": "p384"}
# Extensions whose meaning we understand (and then ignore: policy decides). Any other
# extension marked critical means the requester expects a semantics we would not honour.
UNDERSTOOD_EXTENSIONS = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }
)
# Certificates start a little in the past so an agent whose clock is slightly behind can
# use its certificate at once.
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_MAX_VALIDITY = timedelta(days=90)
URN_UUID_PREFIX = "urn:uuid:"

CSR_TOO_LARGE = f"the CSR is larger than {MAX_CSR_BYTES} bytes"
CSR_NOT_PEM = "the CSR is not a PEM-encoded PKCS#10 certificate request"
CSR_BAD_SIGNATURE = "the CSR's own signature does not verify"
CSR_KEY_TYPE_NOT_ALLOWED = (
    "the CSR's key type {key_type} is not allowed (allowed: Ed25519, ECDSA P-256 or P-384, RSA of 2048-8192 bits)"
)
CSR_EXTENSIONS_INVALID = "the CSR's requested extensions cannot be parsed"
CSR_REQUESTS_CA = "the CSR asks for a CA certificate (basicConstraints CA:true); agents get end-entity certificates"
CSR_UNKNOWN_CRITICAL_EXTENSION = "the CSR has a critical extension the server does not understand ({oid})"
CSR_OTHER_AGENT = "the CSR names another agent's instance uid; a CSR may only name the agent that sends it"
CSR_SUBJECT_ALT_NAMES = (
    "the CSR asks for subject alternative names; the server sets the names itself and accepts no SAN "
    "other than the sender's own urn:uuid URI"
)

CA_NOT_A_CA = "the certificate is not a CA certificate (basicConstraints CA:true is missing)"
CA_CANNOT_SIGN_CERTIFICATES = "the CA certificate's keyUsage does not allow keyCertSign"
CA_KEY_MISMATCH = "the private key does not belong to the CA certificate"
CA_KEY_TYPE_NOT_ALLOWED = "the CA key must be Ed25519, ECDSA or RSA"
CA_EXPIRED = "the CA certificate is not valid now (valid {not_before} to {not_after})"
CA_FILE_UNREADABLE = "cannot load the CA {what} from {path}: {problem}"
CA_KEY_TYPES = ("ecdsa-p256", "ed25519")


class CsrRejected(ValueError):
    """A CSR refused by policy. `message` is one of the CSR_* constants; safe to show the agent."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CaInvalid(ValueError):
    """A CA key/certificate pair that cannot be used to issue agent certificates."""


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed every check, bound to the instance uid that sent it."""

    instance_uid: uuid.UUID
    public_key: AgentPublicKey = field(repr=False)
    key_type: str
    csr: x509.CertificateSigningRequest = field(repr=False)


@dataclass(frozen=True)
class LoadedCa:
    """A CA certificate and its private key, loaded from files. The repr hides the key."""

    key: CaPrivateKey = field(repr=False)
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def fingerprint_sha256(self) -> str:
        return certificate_fingerprint(self.cert)


# --- helpers ----------------------------------------------------------------------------


def describe_public_key(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ecdsa-{ALLOWED_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__.removesuffix("PublicKey").removeprefix("_").lower() or "unknown"


def _key_allowed(key: Any) -> bool:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return True
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in ALLOWED_CURVES
    if isinstance(key, rsa.RSAPublicKey):
        return MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS
    return False


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _signing_hash(key: Any) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 hashes internally; cryptography requires None here
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _named_uid(value: str) -> uuid.UUID | None:
    """The instance uid a subject value or URI names, if it is one (any UUID spelling)."""
    try:
        return uuid.UUID(value.strip())
    except (ValueError, AttributeError):
        return None


def _requested_uids(csr: x509.CertificateSigningRequest, san: x509.SubjectAlternativeName | None) -> list[uuid.UUID]:
    values = [
        str(attribute.value) for attribute in csr.subject if attribute.oid in (NameOID.COMMON_NAME, NameOID.USER_ID)
    ]
    if san is not None:
        values += [
            uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(URN_UUID_PREFIX)
        ]
    return [uid for value in values if (uid := _named_uid(value)) is not None]


# --- CSR checks -------------------------------------------------------------------------


def is_pem_text(data: bytes) -> bool:
    """PEM is printable ASCII and line breaks; anything else (a NUL byte, binary DER) is not
    a PEM CSR, and is never stored (PostgreSQL refuses NUL in text)."""
    return _PEM_TEXT.fullmatch(data) is not None


def check_csr(pem: bytes, *, instance_uid: uuid.UUID) -> CheckedCsr:
    """Validate an agent's CSR against policy, in a fixed order, or raise `CsrRejected`.

    `instance_uid` is the authenticated sender. Order: parse; the CSR's own signature
    (before anything in it is believed); key type; no CA:true; no unknown critical
    extension; any instance uid it names is the sender's; no SAN but the sender's own
    `urn:uuid:` URI. SANs are refused rather than silently dropped so that a requester
    expecting a DNS or IP name learns at once that it will not get one.
    """
    if len(pem) > MAX_CSR_BYTES:
        raise CsrRejected(CSR_TOO_LARGE)
    if not is_pem_text(pem):
        raise CsrRejected(CSR_NOT_PEM)
    try:
        csr = x509.load_pem_x509_csr(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CsrRejected(CSR_NOT_PEM) from None

    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrRejected(CSR_KEY_TYPE_NOT_ALLOWED.format(key_type="unsupported")) from None
    try:
        signature_valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        signature_valid = False
    if not signature_valid:
        raise CsrRejected(CSR_BAD_SIGNATURE)

    key_type = describe_public_key(public_key)
    if not _key_allowed(public_key):
        raise CsrRejected(CSR_KEY_TYPE_NOT_ALLOWED.format(key_type=key_type))

    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise CsrRejected(CSR_EXTENSIONS_INVALID) from None
    by_oid = {extension.oid: extension for extension in extensions}
    basic = by_oid.get(ExtensionOID.BASIC_CONSTRAINTS)
    if basic is not None and isinstance(basic.value, x509.BasicConstraints) and basic.value.ca:
        raise CsrRejected(CSR_REQUESTS_CA)
    for extension in extensions:
        if extension.critical and extension.oid not in UNDERSTOOD_EXTENSIONS:
            raise CsrRejected(CSR_UNKNOWN_CRITICAL_EXTENSION.format(oid=extension.oid.dotted_string))

    san_extension = by_oid.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    san = san_extension.value if san_extension is not None else None
    if not isinstance(san, x509.SubjectAlternativeName):
        san = None
    if any(uid != instance_uid for uid in _requested_uids(csr, san)):
        raise CsrRejected(CSR_OTHER_AGENT)
    if san is not None and any(_san_names_other(name, instance_uid) for name in san):
        raise CsrRejected(CSR_SUBJECT_ALT_NAMES)

    # _key_allowed admitted only the three key classes AgentPublicKey names.
    return CheckedCsr(
        instance_uid=instance_uid, public_key=cast(AgentPublicKey, public_key), key_type=key_type, csr=csr
    )


def _san_names_other(name: x509.GeneralName, instance_uid: uuid.UUID) -> bool:
    # The sender's own uid in any URI spelling (upper case, no dashes) is still its own.
    if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(URN_UUID_PREFIX):
        return _named_uid(name.value) != instance_uid
    return True


# --- issuance ---------------------------------------------------------------------------


def issue_certificate(
    checked: CheckedCsr,
    *,
    ca_key: CaPrivateKey,
    ca_cert: x509.Certificate,
    validity: timedelta,
    max_validity: timedelta = DEFAULT_MAX_VALIDITY,
    now: datetime | None = None,
) -> x509.Certificate:
    """A client certificate for `checked.instance_uid`, built from policy alone.

    Subject CN and the only SAN (`urn:uuid:<uid>`) come from the authenticated uid;
    CA:false; keyUsage digitalSignature (+keyAgreement for EC keys); EKU clientAuth only;
    a random serial (up to 159 bits, never under 64 in practice); validity capped by
    `max_validity` and by the CA's own expiry.
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    not_before = moment - CLOCK_SKEW
    not_after = min(not_before + min(validity, max_validity), ca_cert.not_valid_after_utc)
    uid = str(checked.instance_uid)
    is_ec = isinstance(checked.public_key, ec.EllipticCurvePublicKey)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uid)]))
        .issuer_name(ca_cert.subject)
        .public_key(checked.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=is_ec,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URN_UUID_PREFIX}{uid}")]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(checked.public_key), critical=False)
        .add_extension(authority_key_id, critical=False)
    )
    return builder.sign(ca_key, _signing_hash(ca_key))


def renewal_due_at(*, not_before: datetime, not_after: datetime) -> datetime:
    """The moment a third of the certificate's validity is left: renew from then on."""
    return not_after - (not_after - not_before) / 3


def needs_renewal(*, not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """True once less than a third of the certificate's validity is left (or it expired)."""
    return now > renewal_due_at(not_before=not_before, not_after=not_after)


# --- revocation -------------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None = None


def build_crl(
    revoked: Iterable[RevokedEntry | tuple[int, datetime]],
    *,
    ca_key: CaPrivateKey,
    ca_cert: x509.Certificate,
    next_update_hours: float,
    now: datetime | None = None,
) -> bytes:
    """A signed CRL (PEM) listing `revoked` as (serial, revoked_at[, reason]) entries."""
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(moment)
        .next_update(moment + timedelta(hours=next_update_hours))
        # Seconds since the epoch always go up, so every process issues increasing CRL
        # numbers without sharing a counter.
        .add_extension(x509.CRLNumber(int(moment.timestamp())), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for item in revoked:
        entry = item if isinstance(item, RevokedEntry) else RevokedEntry(serial=item[0], revoked_at=item[1])
        revoked_builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at.astimezone(UTC).replace(microsecond=0))
        )
        if entry.reason is not None:
            revoked_builder = revoked_builder.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(revoked_builder.build())
    crl = builder.sign(ca_key, _signing_hash(ca_key))
    return crl.public_bytes(serialization.Encoding.PEM)


# --- the CA itself ----------------------------------------------------------------------


def create_ca(*, common_name: str, days: int, key_type: str = "ecdsa-p256", now: datetime | None = None) -> LoadedCa:
    """A new self-signed CA that may sign end-entity certificates only (pathlen 0)."""
    key: CaPrivateKey
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unsupported CA key type {key_type!r}; choose one of {', '.join(CA_KEY_TYPES)}")
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, _signing_hash(key))
    )
    return LoadedCa(key=key, cert=cert)


def write_ca(ca: LoadedCa, *, key_file: str | Path, cert_file: str | Path) -> None:
    """Write the key (0600, never overwriting) and then the certificate (never overwriting)."""
    if Path(cert_file).exists():
        raise SigningKeyError(f"refusing to overwrite the existing certificate file {cert_file}")
    write_new_private_file(key_file, private_key_pem_pkcs8(ca.key))
    with open(cert_file, "x", encoding="ascii") as handle:
        handle.write(ca.cert_pem)


def validate_ca(*, key: Any, cert: x509.Certificate, now: datetime | None = None) -> LoadedCa:
    """The pair as a LoadedCa if it can issue agent certificates, else `CaInvalid`."""
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaInvalid(CA_KEY_TYPE_NOT_ALLOWED)
    if not is_ca_certificate(cert):
        raise CaInvalid(CA_NOT_A_CA)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.key_cert_sign:
        raise CaInvalid(CA_CANNOT_SIGN_CERTIFICATES)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CaInvalid(CA_KEY_MISMATCH)
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise CaInvalid(
            CA_EXPIRED.format(
                not_before=cert.not_valid_before_utc.isoformat(), not_after=cert.not_valid_after_utc.isoformat()
            )
        )
    return LoadedCa(key=key, cert=cert)


def load_ca(*, key_file: str | Path, cert_file: str | Path, now: datetime | None = None) -> LoadedCa:
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as error:
        raise CaInvalid(CA_FILE_UNREADABLE.format(what="certificate", path=cert_file, problem=error)) from None
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        # Only the error's type: its text could quote key material.
        raise CaInvalid(CA_FILE_UNREADABLE.format(what="key", path=key_file, problem=type(error).__name__)) from None
    return validate_ca(key=key, cert=cert, now=now)
