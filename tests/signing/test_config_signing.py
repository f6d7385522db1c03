"""Config signatures: what the agent accepts and what it refuses (pure, no database)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import UTC, datetime

import pytest

from opamp.config_signature import (
    BAD_SIGNATURE,
    CONFIGURATION_MISMATCH,
    HASH_MISMATCH,
    LEGACY_SIGNED_CONFIG_DOMAIN,
    SEQUENCE_REPLAYED,
    SEQUENCE_REUSED,
    SIGNED_CONFIG_DOMAIN,
    UNKNOWN_KEY,
    AppliedSigning,
    BadSignature,
    ConfigHashMismatch,
    ConfigurationMismatch,
    MalformedSignature,
    SequenceReplayed,
    SequenceReused,
    SignedConfig,
    SigningKeyError,
    UnknownSigningKey,
    canonical_envelope_bytes,
    key_id_for,
    load_public_keys_dir,
    split_signature_file,
    verify_signed_config,
)
from signing.config_signing import KEY_FILE_EXISTS, SigningKeyPair, generate_signing_key, load_private_key, sign_config

HASH = hashlib.sha256(b"receivers: {}").hexdigest()
OTHER_HASH = hashlib.sha256(b"receivers: {evil: {}}").hexdigest()
ISSUED = datetime(2025, 3, 1, 12, 30, 15, 999, tzinfo=UTC)


@pytest.fixture(scope="module")
def key() -> SigningKeyPair:
    return SigningKeyPair.generate()


def signed(key: SigningKeyPair, *, sequence: int = 3, config_hash: str = HASH) -> SignedConfig:
    return sign_config(key=key, config_hash_hex=config_hash, configuration="edge", sequence=sequence, issued_at=ISSUED)


def running(sequence: int, config_hash: str = HASH) -> AppliedSigning:
    return AppliedSigning(sequence=sequence, config_hash=config_hash)


def trusting(*keys: SigningKeyPair) -> dict:
    return {pair.key_id: pair.public_key for pair in keys}


def test_a_signed_config_verifies_and_returns_its_envelope(key):
    envelope = verify_signed_config(signed(key), trusted_keys=trusting(key), config_hash_hex=HASH, running=None)
    assert envelope.config_hash == HASH
    assert envelope.configuration == "edge"
    assert envelope.sequence == 3
    assert envelope.issued_at == "2025-03-01T12:30:15Z"
    assert envelope.key_id == key.key_id


def test_the_signature_survives_serialisation_to_json_bytes(key):
    data = signed(key).to_json_bytes()
    assert (
        verify_signed_config(data, trusted_keys=trusting(key), config_hash_hex=HASH, running=running(3)).sequence == 3
    )
    assert SignedConfig.from_json_bytes(data) == signed(key)


def test_signing_the_same_version_at_the_same_time_gives_identical_bytes(key):
    assert signed(key).to_json_bytes() == signed(key).to_json_bytes()


def test_the_canonical_bytes_are_the_domain_and_sorted_compact_json(key):
    envelope = signed(key).envelope
    expected = json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    assert canonical_envelope_bytes(envelope) == SIGNED_CONFIG_DOMAIN + expected


def test_the_key_id_is_the_start_of_the_sha256_of_the_raw_public_key(key):
    raw = key.public_key.public_bytes_raw()
    assert key.key_id == hashlib.sha256(raw).hexdigest()[:16] == key_id_for(key.public_key)


def test_a_tampered_body_is_refused_as_a_hash_mismatch(key):
    with pytest.raises(ConfigHashMismatch) as refused:
        verify_signed_config(signed(key), trusted_keys=trusting(key), config_hash_hex=OTHER_HASH, running=None)
    assert refused.value.message == HASH_MISMATCH.format(signed=HASH, actual=OTHER_HASH)


def test_a_changed_envelope_is_refused_as_a_bad_signature(key):
    document = signed(key).to_dict()
    document["envelope"]["config_hash"] = OTHER_HASH
    with pytest.raises(BadSignature) as refused:
        verify_signed_config(
            json.dumps(document).encode(), trusted_keys=trusting(key), config_hash_hex=OTHER_HASH, running=None
        )
    assert refused.value.message == BAD_SIGNATURE.format(key_id=key.key_id)


def test_a_signature_by_an_untrusted_key_is_refused(key):
    stranger = SigningKeyPair.generate()
    with pytest.raises(UnknownSigningKey) as refused:
        verify_signed_config(signed(stranger), trusted_keys=trusting(key), config_hash_hex=HASH, running=None)
    assert refused.value.message == UNKNOWN_KEY.format(key_id=stranger.key_id)


def test_a_signature_claiming_a_trusted_key_id_but_made_by_another_key_is_refused(key):
    stranger = SigningKeyPair.generate()
    forged = signed(stranger)
    document = forged.to_dict()
    document["envelope"]["key_id"] = key.key_id
    with pytest.raises(BadSignature):
        verify_signed_config(
            json.dumps(document).encode(), trusted_keys=trusting(key), config_hash_hex=HASH, running=None
        )


def test_a_replayed_older_delivery_is_refused(key):
    with pytest.raises(SequenceReplayed) as refused:
        verify_signed_config(
            signed(key, sequence=2), trusted_keys=trusting(key), config_hash_hex=HASH, running=running(3)
        )
    assert refused.value.message == SEQUENCE_REPLAYED.format(sequence=2, running=3)


def test_a_replayed_older_delivery_of_the_very_content_in_use_is_refused_too(key):
    with pytest.raises(SequenceReplayed):
        verify_signed_config(
            signed(key, sequence=2), trusted_keys=trusting(key), config_hash_hex=HASH, running=running(5)
        )


def test_the_envelope_already_in_use_is_accepted_again_as_a_re_delivery(key):
    envelope = verify_signed_config(signed(key), trusted_keys=trusting(key), config_hash_hex=HASH, running=running(3))
    assert envelope.sequence == 3


def test_the_sequence_in_use_signed_over_other_content_is_refused(key):
    with pytest.raises(SequenceReused) as refused:
        verify_signed_config(
            signed(key, config_hash=OTHER_HASH),
            trusted_keys=trusting(key),
            config_hash_hex=OTHER_HASH,
            running=running(3, HASH),
        )
    assert refused.value.message == SEQUENCE_REUSED.format(sequence=3)


def test_older_content_signed_anew_under_a_higher_sequence_is_accepted(key):
    """Going back to the stable content after a candidate: a new delivery, not a replay."""
    stable_again = signed(key, sequence=4, config_hash=HASH)
    envelope = verify_signed_config(
        stable_again, trusted_keys=trusting(key), config_hash_hex=HASH, running=running(3, OTHER_HASH)
    )
    assert envelope.sequence == 4


def legacy_signed(key: SigningKeyPair, *, version: int, config_hash: str = HASH) -> bytes:
    """A format-v1 document, as servers signed before sequences existed."""
    envelope = {
        "config_hash": config_hash,
        "configuration": "edge",
        "version": version,
        "issued_at": "2025-03-01T12:30:15Z",
        "key_id": key.key_id,
    }
    body = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
    signature = base64.b64encode(key.private_key.sign(LEGACY_SIGNED_CONFIG_DOMAIN + body)).decode()
    return json.dumps({"envelope": envelope, "signature": signature}).encode()


def test_a_v1_envelope_still_verifies_with_its_version_read_as_the_sequence(key):
    envelope = verify_signed_config(
        legacy_signed(key, version=2), trusted_keys=trusting(key), config_hash_hex=HASH, running=None
    )
    assert (envelope.sequence, envelope.legacy) == (2, True)
    with pytest.raises(SequenceReplayed):
        verify_signed_config(
            legacy_signed(key, version=2), trusted_keys=trusting(key), config_hash_hex=HASH, running=running(3)
        )


def test_a_v1_envelope_relabelled_as_v2_does_not_verify(key):
    document = json.loads(legacy_signed(key, version=7))
    document["envelope"]["sequence"] = document["envelope"].pop("version")
    with pytest.raises(BadSignature):
        verify_signed_config(
            json.dumps(document).encode(), trusted_keys=trusting(key), config_hash_hex=HASH, running=None
        )


def test_a_signature_for_another_configuration_is_refused_when_the_agent_names_its_own(key):
    with pytest.raises(ConfigurationMismatch) as refused:
        verify_signed_config(
            signed(key), trusted_keys=trusting(key), config_hash_hex=HASH, running=None, configuration="core"
        )
    assert refused.value.message == CONFIGURATION_MISMATCH.format(signed="edge", expected="core")


def test_after_a_key_rotation_both_accepted_keys_verify(key):
    next_key = SigningKeyPair.generate()
    trusted = trusting(key, next_key)
    old = verify_signed_config(signed(key), trusted_keys=trusted, config_hash_hex=HASH, running=None)
    new = verify_signed_config(
        signed(next_key, sequence=4), trusted_keys=trusted, config_hash_hex=HASH, running=running(3)
    )
    assert (old.key_id, new.key_id) == (key.key_id, next_key.key_id)


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b"[]",
        b'{"envelope": {}, "signature": "AA=="}',
        b'{"signature": "AA=="}',
        b"{" + b" " * 20000 + b"}",
    ],
    ids=["not-json", "not-an-object", "empty-envelope", "no-envelope", "oversized"],
)
def test_malformed_signature_documents_are_refused(key, document):
    with pytest.raises(MalformedSignature):
        verify_signed_config(document, trusted_keys=trusting(key), config_hash_hex=HASH, running=None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("sequence", True), ("sequence", 0), ("sequence", "3"), ("issued_at", "2025-03-01 12:30"), ("extra", 1)],
)
def test_an_envelope_with_a_wrong_field_is_refused_even_when_otherwise_valid(key, field, value):
    document = signed(key).to_dict()
    document["envelope"][field] = value
    with pytest.raises(MalformedSignature):
        verify_signed_config(
            json.dumps(document).encode(), trusted_keys=trusting(key), config_hash_hex=HASH, running=None
        )


def test_the_signature_file_is_split_from_the_files_it_covers(key):
    files = {"collector.yaml": b"a", "opamp-signature.json": b"sig"}
    rest, signature_file = split_signature_file(files)
    assert rest == {"collector.yaml": b"a"}
    assert signature_file == b"sig"


def test_a_generated_key_file_is_pkcs8_pem_readable_only_by_its_owner(tmp_path):
    path = tmp_path / "signing.key"
    pair = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_id_for(load_private_key(path).public_key()) == pair.key_id


def test_generating_a_key_never_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "signing.key"
    path.write_text("precious")
    with pytest.raises(SigningKeyError) as refused:
        generate_signing_key(path)
    assert str(refused.value) == KEY_FILE_EXISTS.format(path=path)
    assert path.read_text() == "precious"


def test_the_key_pair_repr_does_not_show_the_private_key(key):
    assert "private" not in repr(key).lower()
    assert key.key_id in repr(key)


def test_public_keys_are_loaded_from_a_directory_by_key_id(tmp_path, key):
    (tmp_path / "next.pem").write_text(key.public_key_pem)
    (tmp_path / "junk.pem").write_text("not a key")
    assert set(load_public_keys_dir(tmp_path)) == {key.key_id}
