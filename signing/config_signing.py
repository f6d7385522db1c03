"""The server's side of config signatures: Ed25519 private key files and signing deliveries.

The envelope, its canonical bytes and verification are shared with the agents and live in
`opamp.config_signature`; this module holds what only the server does: create and load the
private key files (mode 0600, never overwritten), publish public keys as PEM and sign one
delivery of a configuration's content under a signing sequence.

Pure (the standard library and `cryptography` only).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from opamp.config_signature import (
    MAX_CONFIGURATION_NAME_CHARS,
    SHA256_HEX,
    SignedConfig,
    SignedEnvelope,
    SigningKeyError,
    canonical_envelope_bytes,
    key_id_for,
    rfc3339_utc,
)

KEY_FILE_EXISTS = "refusing to overwrite the existing key file {path}"
KEY_FILE_NOT_ED25519 = "the key file {path} does not hold an Ed25519 private key"
KEY_FILE_UNREADABLE = "cannot load a private key from {path}: {problem}"
SEQUENCE_INVALID = "the signing sequence must be a positive integer"
CONFIG_HASH_INVALID = "the config hash must be 64 lowercase hex characters (SHA-256)"
CONFIGURATION_NAME_INVALID = "the configuration name must be 1-200 characters"


# --- keys -------------------------------------------------------------------------------


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
        "ascii"
    )


@dataclass(frozen=True)
class SigningKeyPair:
    """An Ed25519 private key and its key id. The repr never shows the private key."""

    private_key: Ed25519PrivateKey = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id_for(self.private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.public_key)

    @classmethod
    def generate(cls) -> SigningKeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SigningKeyPair:
        return cls(load_private_key(path))


def write_new_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; refuse if it exists.

    O_EXCL makes "refuse to overwrite" atomic, and the mode is given to open() so the file
    is never readable by others, not even between create and chmod. fchmod then removes any
    doubt about the process umask.
    """
    target = Path(path)
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningKeyError(KEY_FILE_EXISTS.format(path=target)) from None
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            descriptor = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if descriptor != -1:
            os.close(descriptor)
        target.unlink(missing_ok=True)
        raise


def private_key_pem_pkcs8(private_key: Any) -> bytes:
    return bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def generate_signing_key(path: str | os.PathLike[str]) -> SigningKeyPair:
    """A new Ed25519 key written to `path` as unencrypted PKCS#8 PEM, mode 0600."""
    pair = SigningKeyPair.generate()
    write_new_private_file(path, private_key_pem_pkcs8(pair.private_key))
    return pair


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as error:
        # The problem text never includes the file's content.
        raise SigningKeyError(KEY_FILE_UNREADABLE.format(path=path, problem=type(error).__name__)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(KEY_FILE_NOT_ED25519.format(path=path))
    return key


# --- signing ----------------------------------------------------------------------------


def sign_config(
    *,
    key: SigningKeyPair,
    config_hash_hex: str,
    configuration: str,
    sequence: int,
    issued_at: datetime | None = None,
) -> SignedConfig:
    """Sign one delivery of a configuration's content under `sequence`.

    The server signs once per sequence and stores the result, so every process delivers
    the same bytes for it.
    """
    if not isinstance(config_hash_hex, str) or not SHA256_HEX.match(config_hash_hex):
        raise ValueError(CONFIG_HASH_INVALID)
    if not isinstance(configuration, str) or not 0 < len(configuration) <= MAX_CONFIGURATION_NAME_CHARS:
        raise ValueError(CONFIGURATION_NAME_INVALID)
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise ValueError(SEQUENCE_INVALID)
    envelope = SignedEnvelope(
        config_hash=config_hash_hex,
        configuration=configuration,
        sequence=sequence,
        issued_at=rfc3339_utc(issued_at or datetime.now(UTC)),
        key_id=key.key_id,
    )
    signature = key.private_key.sign(canonical_envelope_bytes(envelope))
    return SignedConfig(envelope=envelope, signature=base64.b64encode(signature).decode("ascii"))
