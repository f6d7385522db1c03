"""Builders for CSRs, good and bad, with keys generated once per test session."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from functools import cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

UNKNOWN_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1.1")


@cache
def key(kind: str) -> Any:
    """One private key per kind for the whole session (RSA generation is the slow part)."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def make_csr(
    kind: str = "ed25519",
    *,
    common_name: str | None = None,
    uid_attribute: str | None = None,
    ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
    unknown_critical_extension: bool = False,
    unknown_extension_critical: bool = True,
    garbled_basic_constraints: bool = False,
) -> bytes:
    private_key = key(kind)
    attributes = []
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if uid_attribute is not None:
        attributes.append(x509.NameAttribute(NameOID.USER_ID, uid_attribute))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if unknown_critical_extension:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(UNKNOWN_EXTENSION_OID, b"\x05\x00"), critical=unknown_extension_critical
        )
    if garbled_basic_constraints:
        # A known extension whose value does not parse.
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"garbage"), critical=False
        )
    algorithm = None if kind == "ed25519" else hashes.SHA256()
    csr = builder.sign(private_key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM)


def with_broken_signature(pem: bytes) -> bytes:
    """The same CSR with the last byte of its signature flipped."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode("ascii")
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode("ascii")


def urn(uid: uuid.UUID) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"urn:uuid:{uid}")
