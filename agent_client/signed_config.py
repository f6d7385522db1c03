"""Signed remote configs: what an agent with trusted keys checks before applying anything.

An agent given trusted Ed25519 public keys declares the custom capability
`io.opamp.signed-config/v1`; the server then adds the file `opamp-signature.json` to the
config map it offers. The signature covers the canonical hash of the OTHER files, the
configuration name and a signing sequence that goes up with every delivery of the
configuration (going back to older content is a new delivery, under a higher sequence).
The agent:

- refuses a config without the signature file;
- hashes the remaining files itself and refuses them when they do not hash to the offered
  `config_hash` (a changed body);
- verifies the signature with `opamp.config_signature.verify_signed_config` against that
  hash and the signing it runs for the configuration (a lower sequence is a replay of an
  older delivery and refused; the same envelope again is a re-delivery and accepted);
- applies only the remaining files, never the signature file.

Every refusal is a `ConfigRejected`, so it is reported as FAILED like any other rejected
config and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client.remote_config import ConfigFile, ConfigRejected
from opamp.config_signature import (
    AppliedSigning,
    SignatureError,
    SignedConfig,
    SignedEnvelope,
    key_id_for,
    split_signature_file,
    verify_signed_config,
)
from opamp.hashing import config_map_hash

__all__ = [
    "NOT_SIGNED",
    "OFFERED_HASH_MISMATCH",
    "SIGNATURE_REFUSED",
    "VerifiedConfig",
    "content_hash",
    "record_signing",
    "trusted_keys_by_id",
    "verify_remote_config",
]

NOT_SIGNED = "config is not signed"
SIGNATURE_REFUSED = "signature refused: {reason}"
OFFERED_HASH_MISMATCH = "config refused: its files hash to {actual}, not to the offered config hash {offered}"


@dataclass(frozen=True)
class VerifiedConfig:
    """The files to apply (without the signature file) and the envelope that vouched for them."""

    files: dict[str, ConfigFile]
    envelope: SignedEnvelope


def trusted_keys_by_id(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Public keys indexed by their key id, as `AgentSettings.trusted_keys` wants them."""
    return {key_id_for(key): key for key in keys}


def content_hash(files: Mapping[str, ConfigFile]) -> bytes:
    """The config hash of `files` without the signature file: what the signature covers."""
    rest, _ = split_signature_file(files)
    return config_map_hash(rest)


def verify_remote_config(
    files: Mapping[str, ConfigFile],
    *,
    offered_hash: bytes,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    applied: Mapping[str, AppliedSigning],
) -> VerifiedConfig:
    """The files to apply, or ConfigRejected saying why the offer is refused.

    `applied` maps a configuration name to the signing applied last (the highest sequence).
    """
    rest, signature_file = split_signature_file(files)
    if signature_file is None:
        raise ConfigRejected(NOT_SIGNED)
    actual = config_map_hash(rest)
    if offered_hash and actual != offered_hash:
        raise ConfigRejected(OFFERED_HASH_MISMATCH.format(actual=actual.hex(), offered=offered_hash.hex()))
    try:
        signed = SignedConfig.from_json_bytes(signature_file.body)
        # The name is looked up before the signature is checked, but nothing comes of it
        # unless the signature (which covers the name) verifies.
        envelope = verify_signed_config(
            signed,
            trusted_keys=trusted_keys,
            config_hash_hex=actual.hex(),
            running=applied.get(signed.envelope.configuration),
            configuration=signed.envelope.configuration,
        )
    except SignatureError as error:
        raise ConfigRejected(SIGNATURE_REFUSED.format(reason=error.message)) from None
    return VerifiedConfig(files=rest, envelope=envelope)


def record_signing(applied: Mapping[str, AppliedSigning], envelope: SignedEnvelope) -> dict[str, AppliedSigning]:
    """`applied` after applying `envelope` (verified: its sequence is not below the one recorded)."""
    signings = dict(applied)
    signings[envelope.configuration] = AppliedSigning.of(envelope)
    return signings
