"""Ed25519 signatures over package files: the envelope both sides share, and its verification.

A package file travels as a `DownloadableFile`; its `signature` field carries the JSON
document `SignedPackageFile.to_json_bytes()`. The server signs (rollouts, with the signing
keys of `signing.config_signing`), the agent verifies with this very code before it
installs anything. What is signed is a small canonical envelope, not the file: the package
name, the version, the SHA-256 of the exact bytes served and the signing key's id. The
verifier recomputes the SHA-256 of the bytes it downloaded and takes the name and the
version from the offer itself, so a file swapped for another (even another signed file of
another package or version) is refused.

The domain string differs from the config signature's, so neither signature can be passed
off as the other.

Pure: the standard library and `cryptography` only.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from opamp.config_signature import (
    SHA256_HEX,
    BadSignature,
    MalformedSignature,
    SignatureError,
    UnknownSigningKey,
    load_signature_document,
)

SIGNED_PACKAGE_DOMAIN = b"opamp-package-file/v1\n"
ENVELOPE_FIELDS = frozenset({"package", "version", "sha256", "key_id"})
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
MAX_NAME_CHARS = 200

MALFORMED = "the package signature is malformed: {problem}"
UNKNOWN_KEY = "the package is signed with key {key_id}, which this agent does not trust"
BAD_SIGNATURE = "the package signature does not verify with key {key_id}"
CONTENT_MISMATCH = "the package file does not match its signature: signed SHA-256 {signed}, the file hashes to {actual}"
PACKAGE_MISMATCH = (
    "the signature is for package {signed_package!r} version {signed_version!r}, not {package!r} version {version!r}"
)


class PackageContentMismatch(SignatureError):
    """The downloaded bytes are not the bytes that were signed."""


class PackageMismatch(SignatureError):
    """The signature is genuine but for another package or version."""


@dataclass(frozen=True)
class PackageEnvelope:
    package: str
    version: str
    sha256: str
    key_id: str

    def to_dict(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "sha256": self.sha256, "key_id": self.key_id}


def canonical_package_envelope_bytes(envelope: PackageEnvelope) -> bytes:
    """The exact bytes signed: domain string + sorted, whitespace-free, ASCII JSON."""
    body = json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return SIGNED_PACKAGE_DOMAIN + body.encode("ascii")


@dataclass(frozen=True)
class SignedPackageFile:
    """An envelope and its Ed25519 signature (standard base64): `DownloadableFile.signature`."""

    envelope: PackageEnvelope
    signature: str

    def to_json_bytes(self) -> bytes:
        document = {"envelope": self.envelope.to_dict(), "signature": self.signature}
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json_bytes(cls, data: bytes) -> SignedPackageFile:
        raw = bytes(data)
        if not raw:
            raise MalformedSignature(MALFORMED.format(problem="the file carries no signature"))
        return cls.from_dict(load_signature_document(raw, MALFORMED))

    @classmethod
    def from_dict(cls, document: Any) -> SignedPackageFile:
        if not isinstance(document, dict) or set(document) != {"envelope", "signature"}:
            raise MalformedSignature(MALFORMED.format(problem="expected keys 'envelope' and 'signature'"))
        signature, envelope = document["signature"], document["envelope"]
        if not isinstance(signature, str):
            raise MalformedSignature(MALFORMED.format(problem="signature must be a base64 string"))
        if not isinstance(envelope, dict) or set(envelope) != ENVELOPE_FIELDS:
            raise MalformedSignature(
                MALFORMED.format(problem=f"the envelope must have exactly {sorted(ENVELOPE_FIELDS)}")
            )
        if not all(isinstance(envelope[name], str) for name in ENVELOPE_FIELDS):
            raise MalformedSignature(MALFORMED.format(problem="every envelope field must be a string"))
        if not SHA256_HEX.match(envelope["sha256"]):
            raise MalformedSignature(MALFORMED.format(problem="sha256 must be 64 lowercase hex characters"))
        if not _KEY_ID.match(envelope["key_id"]):
            raise MalformedSignature(MALFORMED.format(problem="key_id must be 16 lowercase hex characters"))
        if (
            not envelope["package"]
            or len(envelope["package"]) > MAX_NAME_CHARS
            or len(envelope["version"]) > MAX_NAME_CHARS
        ):
            raise MalformedSignature(MALFORMED.format(problem="package and version must be 1 to 200 characters"))
        return cls(PackageEnvelope(**envelope), signature)


def sign_package_file(envelope: PackageEnvelope, sign: Callable[[bytes], bytes]) -> SignedPackageFile:
    """`sign` is an Ed25519 private key's `sign` (the private key stays with the caller)."""
    signature = sign(canonical_package_envelope_bytes(envelope))
    return SignedPackageFile(envelope, base64.b64encode(signature).decode("ascii"))


def verify_package_file(
    signature_document: bytes,
    *,
    package: str,
    version: str,
    content_sha256: str,
    trusted_keys: Mapping[str, Ed25519PublicKey],
) -> PackageEnvelope:
    """Check a downloaded file against its signature; raise a `SignatureError` if it fails.

    `content_sha256` is the hex SHA-256 the agent computed over the bytes it downloaded;
    `package` and `version` are what the offer says this file is.
    """
    signed = SignedPackageFile.from_json_bytes(signature_document)
    envelope = signed.envelope
    key = trusted_keys.get(envelope.key_id)
    if key is None:
        raise UnknownSigningKey(UNKNOWN_KEY.format(key_id=envelope.key_id))
    try:
        raw_signature = base64.b64decode(signed.signature, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedSignature(MALFORMED.format(problem="signature is not base64")) from None
    try:
        key.verify(raw_signature, canonical_package_envelope_bytes(envelope))
    except InvalidSignature:
        raise BadSignature(BAD_SIGNATURE.format(key_id=envelope.key_id)) from None
    if envelope.sha256 != content_sha256:
        raise PackageContentMismatch(CONTENT_MISMATCH.format(signed=envelope.sha256, actual=content_sha256))
    if (envelope.package, envelope.version) != (package, version):
        raise PackageMismatch(
            PACKAGE_MISMATCH.format(
                signed_package=envelope.package, signed_version=envelope.version, package=package, version=version
            )
        )
    return envelope
