"""Signing keys in the database: public halves only, one active, rotation without re-enrolment."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.apps import apps
from django.core.management import call_command
from django.core.management.base import CommandError

from fleet.models import AuditEvent
from opamp.config_signature import verify_signed_config
from rollouts.config_signings import sign_delivery
from signing import selectors
from signing.config_signing import SigningKeyPair, generate_signing_key, sign_config
from signing.errors import SIGNING_KEY_IN_USE, SIGNING_KEY_RETIRED, SigningError
from signing.models import SigningKey
from signing.signing_keys import signing_key_register, signing_key_register_active, signing_key_retire

pytestmark = pytest.mark.django_db

HASH = hashlib.sha256(b"receivers: {}").hexdigest()
PUBLISHED = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def key_file(settings, tmp_path) -> Path:
    path = tmp_path / "signing.key"
    generate_signing_key(path)
    settings.OPAMP_SIGNING_KEY_FILE = str(path)
    return path


def test_without_a_configured_key_versions_are_not_signed(settings):
    settings.OPAMP_SIGNING_KEY_FILE = ""
    assert sign_delivery(configuration_name="edge", sequence=1, config_hash=HASH) is None
    assert signing_key_register_active() is None


def test_a_signed_delivery_verifies_with_the_trusted_keys_the_server_publishes(key_file):
    signed = sign_delivery(configuration_name="edge", sequence=2, config_hash=HASH, issued_at=PUBLISHED)
    assert signed is not None
    envelope = verify_signed_config(
        signed.to_json_bytes(), trusted_keys=selectors.trusted_public_keys(), config_hash_hex=HASH, running=None
    )
    assert (envelope.configuration, envelope.sequence, envelope.issued_at) == ("edge", 2, "2025-05-01T08:00:00Z")


def test_signing_the_same_sequence_at_the_same_time_twice_gives_the_same_bytes(key_file):
    first = sign_delivery(configuration_name="edge", sequence=2, config_hash=HASH, issued_at=PUBLISHED)
    second = sign_delivery(configuration_name="edge", sequence=2, config_hash=HASH, issued_at=PUBLISHED)
    assert first is not None and second is not None
    assert first.to_json_bytes() == second.to_json_bytes()


def test_the_configured_key_becomes_the_single_active_key_and_the_previous_one_stays_accepted(settings, tmp_path):
    old_path, new_path = tmp_path / "old.key", tmp_path / "new.key"
    old, new = generate_signing_key(old_path), generate_signing_key(new_path)
    settings.OPAMP_SIGNING_KEY_FILE = str(old_path)
    signing_key_register_active()
    settings.OPAMP_SIGNING_KEY_FILE = str(new_path)
    signing_key_register_active()

    assert list(SigningKey.objects.filter(active=True).values_list("key_id", flat=True)) == [new.key_id]
    trusted = selectors.trusted_public_keys()
    assert set(trusted) == {old.key_id, new.key_id}
    # What the old key signed before the rotation still verifies, and so does the new key's work.
    for pair, sequence in ((old, 1), (new, 2)):
        signed = sign_config(key=pair, config_hash_hex=HASH, configuration="edge", sequence=sequence)
        assert verify_signed_config(signed, trusted_keys=trusted, config_hash_hex=HASH, running=None).key_id == (
            pair.key_id
        )


def test_a_retired_key_is_no_longer_trusted_and_refuses_to_sign(key_file, operator):
    key = signing_key_register_active()
    assert key is not None
    assert signing_key_retire(key=key, actor=operator, force=True) is True
    assert signing_key_retire(key=key, actor=operator) is False
    assert key.key_id not in selectors.trusted_public_keys()
    with pytest.raises(SigningError) as refused:
        sign_delivery(configuration_name="edge", sequence=3, config_hash=HASH)
    assert refused.value.message == SIGNING_KEY_RETIRED.format(key_id=key.key_id)
    assert AuditEvent.objects.filter(action="signing_key.retire").count() == 1


def test_the_key_file_in_use_is_not_retired_without_force_and_publishing_keeps_signing(key_file, operator):
    pair = SigningKeyPair.from_file(key_file)
    # Registered but not yet active: the configured file is what signs, so it is in use.
    key = signing_key_register(public_key_pem=pair.public_key_pem, actor=None)
    with pytest.raises(SigningError) as refused:
        signing_key_retire(key=key, actor=operator)
    assert refused.value.message == SIGNING_KEY_IN_USE.format(key_id=key.key_id)
    assert refused.value.status == 409
    key.refresh_from_db()
    assert key.retired_at is None
    assert not AuditEvent.objects.filter(action="signing_key.retire").exists()
    assert sign_delivery(configuration_name="edge", sequence=1, config_hash=HASH) is not None


def test_after_rotation_the_previous_key_retires_without_force(settings, tmp_path, key_file, operator):
    old = signing_key_register_active()
    assert old is not None
    generate_signing_key(tmp_path / "next.key")
    settings.OPAMP_SIGNING_KEY_FILE = str(tmp_path / "next.key")
    signing_key_register_active()
    assert signing_key_retire(key=old, actor=operator) is True
    assert sign_delivery(configuration_name="edge", sequence=2, config_hash=HASH) is not None


def test_an_extra_public_key_directory_adds_trusted_keys(settings, tmp_path, key_file):
    extra = SigningKeyPair.generate()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "next.pem").write_text(extra.public_key_pem)
    settings.OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR = str(tmp_path / "keys")
    signing_key_register_active()
    assert extra.key_id in selectors.trusted_public_keys()


def test_registering_private_material_as_a_public_key_is_refused(tmp_path):
    path = tmp_path / "k.key"
    generate_signing_key(path)
    with pytest.raises(SigningError):
        signing_key_register(public_key_pem=path.read_text(), actor=None)
    assert not SigningKey.objects.exists()


def test_a_public_key_pasted_together_with_its_private_key_is_stored_without_it(tmp_path):
    path = tmp_path / "k.key"
    pair = generate_signing_key(path)
    key = signing_key_register(public_key_pem=pair.public_key_pem + path.read_text(), actor=None)
    assert key.key_id == pair.key_id
    assert key.public_key_pem == pair.public_key_pem
    assert "PRIVATE" not in SigningKey.objects.get().public_key_pem


def test_create_signing_key_prints_the_key_id_and_public_key_and_stores_no_private_material(tmp_path, capsys):
    path = tmp_path / "signing.key"
    call_command("create_signing_key", str(path))
    output = capsys.readouterr().out
    pair = SigningKeyPair.from_file(path)
    assert f"key id: {pair.key_id}" in output
    assert pair.public_key_pem.strip() in output
    assert "PRIVATE" not in output
    assert SigningKey.objects.get().key_id == pair.key_id

    private_body = "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))
    raw_private = pair.private_key.private_bytes_raw().hex()
    stored: list[str] = []
    for model in [*apps.get_app_config("signing").get_models(), AuditEvent]:
        for row in model.objects.values():
            stored += [str(value) for value in row.values()]
    assert stored
    for value in stored:
        assert "PRIVATE KEY" not in value
        assert private_body not in value
        assert raw_private not in value
        assert not re.search(r"BEGIN (EC |RSA |ENCRYPTED )?PRIVATE", value)


def test_create_signing_key_refuses_to_overwrite_a_file(tmp_path):
    path = tmp_path / "signing.key"
    path.write_text("keep me")
    with pytest.raises(CommandError):
        call_command("create_signing_key", str(path))
    assert path.read_text() == "keep me"
