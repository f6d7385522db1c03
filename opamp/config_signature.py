"""Ed25519 signatures over configuration deliveries: the envelope, its format, verification.

What both sides share: the server signs with it (`signing.config_signing` holds the private
keys and the signing itself) and the agent verifies with the very same code. What is signed
is a small canonical envelope, not the config map itself: the envelope names the config
hash (the canonical digest of the config map, `opamp.hashing.config_map_hash`, hex), the
configuration, a signing sequence, the issue time and the signing key's id. The verifier
recomputes the hash of the files it received, so a changed body or a swapped key is refused.

The sequence counts deliveries, not content: the server signs a version anew, under a
sequence above every one it issued before for the configuration, each time that version
becomes what agents should run (published, rolled back to, a rollout started, stepped,
promoted or retried, aborted or rolled back automatically). An agent refuses a sequence
lower than the one it runs (a replay of an older delivery) and accepts the very envelope
it runs again (a re-delivery); going back to older content arrives under a higher
sequence, so it is never mistaken for a replay.

Envelopes of format v1 (before sequences) carried a per-configuration `version` that only
went up; they still verify, under their own domain string, with that number read as the
sequence (the server continued its sequences above those numbers).

On the wire the signature travels next to the files it covers, as the extra config-map
file `SIGNATURE_FILE_NAME` (JSON), to agents that declared `CUSTOM_CAPABILITY`. The hash
in the envelope is computed over the map WITHOUT that file.

Pure: the standard library and `cryptography` only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_FILE_NAME = "opamp-signature.json"
SIGNATURE_CONTENT_TYPE = "application/json"
CUSTOM_CAPABILITY = "io.opamp.signed-config/v1"
# A different domain per signed thing: a signature made for one purpose can never be
# replayed as another (e.g. a package signature passed off as a config signature).
SIGNED_CONFIG_DOMAIN = b"opamp-signed-config/v2\n"
ENVELOPE_FIELDS = frozenset({"config_hash", "configuration", "sequence", "issued_at", "key_id"})
# Format v1: `version` instead of `sequence`, signed under its own domain string, so a v1
# signature can never be presented as a v2 one or the other way round.
LEGACY_SIGNED_CONFIG_DOMAIN = b"opamp-signed-config/v1\n"
LEGACY_ENVELOPE_FIELDS = frozenset({"config_hash", "configuration", "version", "issued_at", "key_id"})
# A signature document is a few hundred bytes; anything far larger is not one of ours and
# is refused before json.loads spends memory on it.
MAX_SIGNATURE_DOCUMENT_BYTES = 16 * 1024
MAX_CONFIGURATION_NAME_CHARS = 200

KEY_ID_HEX_CHARS = 16
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_RFC3339_UTC_SECONDS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_ISSUED_AT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

MALFORMED_DOCUMENT = "the config signature is malformed: {problem}"
UNKNOWN_KEY = "the config is signed with key {key_id}, which this agent does not trust"
BAD_SIGNATURE = "the config signature does not verify with key {key_id}"
HASH_MISMATCH = "the config does not match its signature: signed hash {signed}, received content hashes to {actual}"
CONFIGURATION_MISMATCH = "the signature is for configuration {signed!r}, not {expected!r}"
SEQUENCE_REPLAYED = (
    "the signed config has signing sequence {sequence}, older than sequence {running} already in use (a replay)"
)
SEQUENCE_REUSED = "the signed config reuses signing sequence {sequence} of the config in use for other content"
PUBLIC_KEY_NOT_ED25519 = "the public key is not an Ed25519 key"
PUBLIC_KEY_UNREADABLE = "cannot load a public key: {problem}"


class SignatureError(Exception):
    """A signed config the verifier refuses. The message is safe to report to the server."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedSignature(SignatureError):
    """The signature document is not a well-formed v1 signature."""


class UnknownSigningKey(SignatureError):
    """Signed with a key id that is not among the trusted keys."""


class BadSignature(SignatureError):
    """The signature does not verify over the envelope."""


class ConfigHashMismatch(SignatureError):
    """The files received are not the ones that were signed (tampered body)."""


class ConfigurationMismatch(SignatureError):
    """A valid signature made for another configuration."""


class SequenceReplayed(SignatureError):
    """A valid signature under a sequence lower than the one in use: an older delivery replayed."""


class SequenceReused(SignatureError):
    """A valid signature under the sequence in use, for other content (never issued by a server
    that allocates each sequence once; refused all the same)."""


class SigningKeyError(Exception):
    """A key file that cannot be created or loaded."""


# --- public keys ------------------------------------------------------------------------


def public_key_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key_raw(public_key)).hexdigest()[:KEY_ID_HEX_CHARS]


def load_public_key_pem(pem: bytes | str) -> Ed25519PublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise SigningKeyError(PUBLIC_KEY_UNREADABLE.format(problem=error)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(PUBLIC_KEY_NOT_ED25519)
    return key


def load_public_keys_dir(path: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Every `*.pem` Ed25519 public key in a directory, by key id (others are skipped)."""
    keys: dict[str, Ed25519PublicKey] = {}
    directory = Path(path)
    if not directory.is_dir():
        return keys
    for entry in sorted(directory.glob("*.pem")):
        try:
            key = load_public_key_pem(entry.read_bytes())
        except (OSError, SigningKeyError):
            continue
        keys[key_id_for(key)] = key
    return keys


# --- the signed envelope ----------------------------------------------------------------


def rfc3339_utc(moment: datetime) -> str:
    """`moment` as the envelope's `issued_at`: RFC 3339, UTC, whole seconds."""
    if moment.tzinfo is None:
        raise ValueError("issued_at must be timezone-aware")
    return moment.astimezone(UTC).replace(microsecond=0).strftime(_ISSUED_AT_FORMAT)


@dataclass(frozen=True)
class SignedEnvelope:
    """What a config signature says; `sequence` only goes up within one configuration.

    `legacy` marks a format-v1 envelope, whose `version` field is read as the sequence.
    """

    config_hash: str
    configuration: str
    sequence: int
    issued_at: str
    key_id: str
    legacy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_hash": self.config_hash,
            "configuration": self.configuration,
            "version" if self.legacy else "sequence": self.sequence,
            "issued_at": self.issued_at,
            "key_id": self.key_id,
        }

    @property
    def domain(self) -> bytes:
        return LEGACY_SIGNED_CONFIG_DOMAIN if self.legacy else SIGNED_CONFIG_DOMAIN

    @property
    def issued_at_datetime(self) -> datetime:
        return datetime.strptime(self.issued_at, _ISSUED_AT_FORMAT).replace(tzinfo=UTC)


def canonical_envelope_bytes(envelope: SignedEnvelope) -> bytes:
    """The exact bytes signed: domain string + sorted, whitespace-free JSON."""
    body = json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return envelope.domain + body.encode("ascii")


def load_signature_document(raw: bytes, malformed: str) -> Any:
    """The JSON of a signature document, refused (`malformed` names what) when it is far
    larger than one of ours, before json.loads spends memory on it, or not JSON at all."""
    if len(raw) > MAX_SIGNATURE_DOCUMENT_BYTES:
        raise MalformedSignature(malformed.format(problem="larger than expected"))
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MalformedSignature(malformed.format(problem="not JSON")) from None


@dataclass(frozen=True)
class SignedConfig:
    """An envelope and its Ed25519 signature (standard base64)."""

    envelope: SignedEnvelope
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {"envelope": self.envelope.to_dict(), "signature": self.signature}

    def to_json_bytes(self) -> bytes:
        """Deterministic bytes, so the same signature is the same config-map file everywhere."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json_bytes(cls, data: bytes | str) -> SignedConfig:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        return cls.from_dict(load_signature_document(raw, MALFORMED_DOCUMENT))

    @classmethod
    def from_dict(cls, document: Any) -> SignedConfig:
        if not isinstance(document, dict) or set(document) != {"envelope", "signature"}:
            raise MalformedSignature(MALFORMED_DOCUMENT.format(problem="expected keys 'envelope' and 'signature'"))
        signature = document["signature"]
        if not isinstance(signature, str):
            raise MalformedSignature(MALFORMED_DOCUMENT.format(problem="signature must be a base64 string"))
        return cls(envelope=_parse_envelope(document["envelope"]), signature=signature)


def _parse_envelope(document: Any) -> SignedEnvelope:
    # Strict on purpose: unknown fields are refused rather than ignored, because an
    # ignored field would be unsigned data the agent might still act on. Each format comes
    # with its own domain string.
    def bad(problem: str) -> MalformedSignature:
        return MalformedSignature(MALFORMED_DOCUMENT.format(problem=problem))

    legacy = isinstance(document, dict) and set(document) == LEGACY_ENVELOPE_FIELDS
    if not isinstance(document, dict) or (set(document) != ENVELOPE_FIELDS and not legacy):
        raise bad("the envelope must have exactly the fields " + ", ".join(sorted(ENVELOPE_FIELDS)))
    config_hash, configuration = document["config_hash"], document["configuration"]
    sequence = document["version" if legacy else "sequence"]
    issued_at, key_id = document["issued_at"], document["key_id"]
    if not isinstance(config_hash, str) or not SHA256_HEX.match(config_hash):
        raise bad("config_hash must be 64 lowercase hex characters")
    if not isinstance(configuration, str) or not 0 < len(configuration) <= MAX_CONFIGURATION_NAME_CHARS:
        raise bad("configuration must be a non-empty string")
    # bool is an int in Python; a JSON `true` is not a sequence.
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise bad("sequence must be a positive integer")
    if not isinstance(issued_at, str) or not _RFC3339_UTC_SECONDS.match(issued_at):
        raise bad("issued_at must be an RFC 3339 UTC time such as 2025-01-31T12:00:00Z")
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise bad("key_id must be 16 lowercase hex characters")
    return SignedEnvelope(
        config_hash=config_hash,
        configuration=configuration,
        sequence=sequence,
        issued_at=issued_at,
        key_id=key_id,
        legacy=legacy,
    )


# --- verification -----------------------------------------------------------------------


def verify_signed_config(
    signed: SignedConfig | bytes | str,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    config_hash_hex: str,
    running: AppliedSigning | None,
    configuration: str | None = None,
) -> SignedEnvelope:
    """The verified envelope, or a `SignatureError` subclass saying why not.

    Order matters: nothing in the envelope is believed before its signature verifies, so
    the hash and sequence checks come after the signature check.
    `config_hash_hex` is the hash the agent computed itself over the files it received
    (without the signature file). `running` is the signing the agent runs now for the
    envelope's configuration (None for none): a lower sequence is a replay and refused;
    the same sequence is accepted as a re-delivery when it names the same content.
    """
    parsed = signed if isinstance(signed, SignedConfig) else SignedConfig.from_json_bytes(signed)
    envelope = parsed.envelope
    public_key = trusted_keys.get(envelope.key_id)
    if public_key is None:
        raise UnknownSigningKey(UNKNOWN_KEY.format(key_id=envelope.key_id))
    try:
        signature = base64.b64decode(parsed.signature, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedSignature(MALFORMED_DOCUMENT.format(problem="signature is not base64")) from None
    try:
        public_key.verify(signature, canonical_envelope_bytes(envelope))
    except InvalidSignature:
        raise BadSignature(BAD_SIGNATURE.format(key_id=envelope.key_id)) from None
    if envelope.config_hash != config_hash_hex.lower():
        raise ConfigHashMismatch(HASH_MISMATCH.format(signed=envelope.config_hash, actual=config_hash_hex.lower()))
    if configuration is not None and envelope.configuration != configuration:
        raise ConfigurationMismatch(
            CONFIGURATION_MISMATCH.format(signed=envelope.configuration, expected=configuration)
        )
    if running is not None:
        if envelope.sequence < running.sequence:
            raise SequenceReplayed(SEQUENCE_REPLAYED.format(sequence=envelope.sequence, running=running.sequence))
        # A record kept before hashes were recorded has none: the sequence alone decides.
        if (
            envelope.sequence == running.sequence
            and running.config_hash
            and running.config_hash != envelope.config_hash
        ):
            raise SequenceReused(SEQUENCE_REUSED.format(sequence=envelope.sequence))
    return envelope


@dataclass(frozen=True)
class AppliedSigning:
    """The signing an agent runs for one configuration: its sequence and the config hash it
    vouched for ("" when unknown, in records kept before hashes were)."""

    sequence: int
    config_hash: str = ""

    @classmethod
    def of(cls, envelope: SignedEnvelope) -> AppliedSigning:
        return cls(sequence=envelope.sequence, config_hash=envelope.config_hash)


FileT = TypeVar("FileT")


def split_signature_file(files: Mapping[str, FileT]) -> tuple[dict[str, FileT], FileT | None]:
    """The config map without the signature file, and that file (None when absent).

    The agent hashes the first part and verifies the second against that hash.
    """
    rest = {name: file for name, file in files.items() if name != SIGNATURE_FILE_NAME}
    return rest, files.get(SIGNATURE_FILE_NAME)
