"""Signed configurations: signed at publish time, the signature delivered only to agents
that declared the signed-config capability; others get the plain files byte for byte."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from opamp.config_signature import (
    CUSTOM_CAPABILITY,
    SIGNATURE_FILE_NAME,
    SignedConfig,
    split_signature_file,
    verify_signed_config,
)
from opamp.hashing import config_map_hash
from opamp.identifiers import uuid7
from rollouts import services
from signing.config_signing import generate_signing_key
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.messages import full_report

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

FILES = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


@pytest.fixture
def signing_key(tmp_path, settings):
    path = tmp_path / "signing-key.pem"
    pair = generate_signing_key(path)
    settings.OPAMP_SIGNING_KEY_FILE = str(path)
    return pair


@database_sync_to_async
def publish() -> tuple[str, int, str]:
    configuration = services.configuration_create(name="signed", selector="service.name=checkout", actor=None)
    version, _ = services.configuration_publish(configuration=configuration, files=FILES, author=None)
    return version.config_hash, version.number, version.signature


async def test_a_version_is_signed_at_publish_time_over_its_hash_name_and_the_first_sequence(signing_key):
    config_hash, _, signature = await publish()
    envelope = verify_signed_config(
        SignedConfig.from_json_bytes(signature.encode()),
        trusted_keys={signing_key.key_id: signing_key.public_key},
        config_hash_hex=config_hash,
        running=None,
    )
    assert (envelope.configuration, envelope.sequence, envelope.key_id) == ("signed", 1, signing_key.key_id)


async def test_an_agent_that_declared_the_capability_gets_the_signature_file(signing_key):
    config_hash, _, _ = await publish()
    message = full_report(uuid7().bytes, 1, service="checkout")
    message.custom_capabilities.capabilities.append(CUSTOM_CAPABILITY)
    async with WsAgent() as agent:
        reply = await agent.exchange(message)
    files = dict(reply.remote_config.config.config_map)
    assert SIGNATURE_FILE_NAME in files
    rest, signature_file = split_signature_file(files)
    assert signature_file is not None
    assert config_map_hash(rest).hex() == config_hash == reply.remote_config.config_hash.hex()
    verify_signed_config(
        SignedConfig.from_json_bytes(signature_file.body),
        trusted_keys={signing_key.key_id: signing_key.public_key},
        config_hash_hex=config_hash,
        running=None,
    )


async def test_other_agents_get_the_plain_files_byte_for_byte(signing_key):
    await publish()
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uuid7().bytes, 1, service="checkout"))
    config_map = reply.remote_config.config.config_map
    assert list(config_map) == ["collector.yaml"]
    assert config_map["collector.yaml"].body == FILES["collector.yaml"]["body"].encode()


async def test_without_a_signing_key_versions_are_unsigned_and_delivered_plainly(settings):
    settings.OPAMP_SIGNING_KEY_FILE = ""
    _, _, signature = await publish()
    assert signature == ""
