"""Signed remote configs: an agent with trusted keys applies only what a trusted key signed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent_client import AgentSettings, ConfigFile, FileState, report
from agent_client.cli import build_parser
from agent_client.cli_commands import settings_from_options
from agent_client.signed_config import NOT_SIGNED, trusted_keys_by_id
from agent_client.testing import FakeWebSocketServer
from opamp.config_signature import CUSTOM_CAPABILITY, SIGNATURE_CONTENT_TYPE, SIGNATURE_FILE_NAME, AppliedSigning
from opamp.hashing import config_map_hash
from opamp.proto import opamp_pb2 as pb
from signing.config_signing import SigningKeyPair, sign_config
from tests.agent_client.helpers import QUIET, is_full_report, make_agent, remote_config, running

APPLIED = pb.RemoteConfigStatuses_APPLIED
APPLYING = pb.RemoteConfigStatuses_APPLYING
FAILED = pb.RemoteConfigStatuses_FAILED

ISSUED_AT = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
CONFIG_V1 = {"collector.yaml": ConfigFile(b"receivers: {otlp: {}}\n", "text/yaml")}
CONFIG_V2 = {"collector.yaml": ConfigFile(b"receivers: {otlp: {}, prometheus: {}}\n", "text/yaml")}


@pytest.fixture(scope="module")
def key() -> SigningKeyPair:
    return SigningKeyPair.generate()


@pytest.fixture
def signed_settings(key: SigningKeyPair) -> AgentSettings:
    return replace(QUIET, trusted_keys=trusted_keys_by_id([key.public_key]))


def signed_offer(
    files: Mapping[str, ConfigFile],
    *,
    key: SigningKeyPair,
    sequence: int = 1,
    configuration: str = "edge",
    sent_files: Mapping[str, ConfigFile] | None = None,
    offered_hash: bytes | None = None,
) -> tuple[pb.ServerToAgent, bytes]:
    """What the server sends: `files` (or `sent_files`, to tamper) plus the signature file."""
    config_hash = config_map_hash(files)
    signed = sign_config(
        key=key, config_hash_hex=config_hash.hex(), configuration=configuration, sequence=sequence, issued_at=ISSUED_AT
    )
    wire = {
        **(files if sent_files is None else sent_files),
        SIGNATURE_FILE_NAME: ConfigFile(signed.to_json_bytes(), SIGNATURE_CONTENT_TYPE),
    }
    offered = config_hash if offered_hash is None else offered_hash
    remote = pb.AgentRemoteConfig(config=report.config_map(wire), config_hash=offered)
    return pb.ServerToAgent(remote_config=remote), offered


async def push_and_wait(server: FakeWebSocketServer, message: pb.ServerToAgent, config_hash: bytes) -> pb.AgentToServer:
    """Push an offer and return the agent's terminal status report for it."""
    await server.push(message)
    applying = await server.next_message()
    assert applying.remote_config_status.status == APPLYING
    assert applying.remote_config_status.last_remote_config_hash == config_hash
    return await server.next_message()


def config_dir_names(state_dir: Path) -> list[str]:
    return sorted(path.name for path in (state_dir / "config").iterdir())


async def test_a_correctly_signed_config_is_applied_without_its_signature_file(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    message, config_hash = signed_offer(CONFIG_V1, key=key)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        applied = await push_and_wait(ws_server, message, config_hash)

    assert applied.remote_config_status.status == APPLIED
    assert applied.remote_config_status.error_message == ""
    effective = dict(applied.effective_config.config_map.config_map.items())
    assert effective.keys() == {"collector.yaml"}
    # The effective config is exactly what was signed, so it hashes to the version hash.
    assert config_map_hash(effective) == config_hash
    assert config_dir_names(state_dir) == ["collector.yaml"]
    assert (state_dir / "config" / "collector.yaml").read_bytes() == CONFIG_V1["collector.yaml"].body
    record = FileState(state_dir).load_remote_config()
    assert record.applied_hash == config_hash
    assert record.files == CONFIG_V1
    assert record.signings == {"edge": AppliedSigning(1, config_hash.hex())}


async def test_a_tampered_body_under_the_offered_hash_fails_and_writes_nothing(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    message, config_hash = signed_offer(CONFIG_V1, key=key, sent_files=CONFIG_V2)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        failed = await push_and_wait(ws_server, message, config_hash)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message.startswith("config refused: its files hash to ")
    assert failed.remote_config_status.last_remote_config_hash == config_hash
    assert not failed.HasField("effective_config")
    assert config_dir_names(state_dir) == []


async def test_a_tampered_body_with_a_recomputed_hash_fails_the_signature_check(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    tampered_hash = config_map_hash(CONFIG_V2)
    message, config_hash = signed_offer(CONFIG_V1, key=key, sent_files=CONFIG_V2, offered_hash=tampered_hash)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        failed = await push_and_wait(ws_server, message, config_hash)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message.startswith(
        "signature refused: the config does not match its signature"
    )
    assert config_dir_names(state_dir) == []


async def test_a_config_signed_by_an_unknown_key_fails(
    ws_server: FakeWebSocketServer, state_dir: Path, signed_settings: AgentSettings
) -> None:
    stranger = SigningKeyPair.generate()
    message, config_hash = signed_offer(CONFIG_V1, key=stranger)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        failed = await push_and_wait(ws_server, message, config_hash)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message == (
        f"signature refused: the config is signed with key {stranger.key_id}, which this agent does not trust"
    )
    assert config_dir_names(state_dir) == []


async def test_a_malformed_signature_file_fails(
    ws_server: FakeWebSocketServer, state_dir: Path, signed_settings: AgentSettings
) -> None:
    files = {**CONFIG_V1, SIGNATURE_FILE_NAME: ConfigFile(b"not json", SIGNATURE_CONTENT_TYPE)}
    config = report.config_map(files)
    remote = pb.AgentRemoteConfig(config=config, config_hash=config_map_hash(CONFIG_V1))
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        failed = await push_and_wait(ws_server, pb.ServerToAgent(remote_config=remote), remote.config_hash)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message == "signature refused: the config signature is malformed: not JSON"
    assert config_dir_names(state_dir) == []


async def test_an_unsigned_config_fails_when_signatures_are_required(
    ws_server: FakeWebSocketServer, state_dir: Path, signed_settings: AgentSettings
) -> None:
    remote = remote_config(CONFIG_V1)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        failed = await push_and_wait(ws_server, pb.ServerToAgent(remote_config=remote), remote.config_hash)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message == NOT_SIGNED == "config is not signed"
    assert config_dir_names(state_dir) == []


async def test_a_replayed_older_delivery_fails_and_the_newer_config_stays_in_effect(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    newer, newer_hash = signed_offer(CONFIG_V2, key=key, sequence=2)
    older, older_hash = signed_offer(CONFIG_V1, key=key, sequence=1)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        applied = await push_and_wait(ws_server, newer, newer_hash)
        assert applied.remote_config_status.status == APPLIED
        failed = await push_and_wait(ws_server, older, older_hash)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message == (
        "signature refused: the signed config has signing sequence 1, older than sequence 2 already in use (a replay)"
    )
    assert (state_dir / "config" / "collector.yaml").read_bytes() == CONFIG_V2["collector.yaml"].body
    record = FileState(state_dir).load_remote_config()
    assert record.applied_hash == newer_hash
    assert record.signings == {"edge": AppliedSigning(2, newer_hash.hex())}


async def test_the_replay_check_survives_a_restart(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    newer, newer_hash = signed_offer(CONFIG_V2, key=key, sequence=2)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        await push_and_wait(ws_server, newer, newer_hash)
    await ws_server.next_message()  # disconnect

    older, older_hash = signed_offer(CONFIG_V1, key=key, sequence=1)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        first = await ws_server.next_message()
        assert first.remote_config_status.status == APPLIED
        failed = await push_and_wait(ws_server, older, older_hash)
    assert failed.remote_config_status.status == FAILED
    assert "older than sequence 2" in failed.remote_config_status.error_message


async def test_older_content_signed_anew_under_a_higher_sequence_is_applied(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        for files, sequence in ((CONFIG_V1, 1), (CONFIG_V2, 2), (CONFIG_V1, 3)):
            message, config_hash = signed_offer(files, key=key, sequence=sequence)
            outcome = await push_and_wait(ws_server, message, config_hash)
            assert outcome.remote_config_status.status == APPLIED
    assert (state_dir / "config" / "collector.yaml").read_bytes() == CONFIG_V1["collector.yaml"].body
    assert FileState(state_dir).load_remote_config().signings == {"edge": AppliedSigning(3, config_hash.hex())}


async def test_sequences_are_tracked_per_configuration(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        message, config_hash = signed_offer(CONFIG_V2, key=key, sequence=5, configuration="edge")
        assert (await push_and_wait(ws_server, message, config_hash)).remote_config_status.status == APPLIED
        message, config_hash = signed_offer(CONFIG_V1, key=key, sequence=1, configuration="gateway")
        assert (await push_and_wait(ws_server, message, config_hash)).remote_config_status.status == APPLIED
    signings = FileState(state_dir).load_remote_config().signings
    assert {name: signing.sequence for name, signing in signings.items()} == {"edge": 5, "gateway": 1}


async def test_a_candidate_then_the_stable_content_signed_anew_is_applied_and_a_replay_of_its_old_envelope_is_not(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    """Stable (sequence 2), candidate (3), abort: stable again under 4; the old 2 is a replay."""
    stable_old, stable_hash = signed_offer(CONFIG_V1, key=key, sequence=2)
    candidate, candidate_hash = signed_offer(CONFIG_V2, key=key, sequence=3)
    stable_again, _ = signed_offer(CONFIG_V1, key=key, sequence=4)
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        assert (await push_and_wait(ws_server, stable_old, stable_hash)).remote_config_status.status == APPLIED
        assert (await push_and_wait(ws_server, candidate, candidate_hash)).remote_config_status.status == APPLIED
        back = await push_and_wait(ws_server, stable_again, stable_hash)
        assert back.remote_config_status.status == APPLIED
        # The candidate's envelope replayed: lower than the stable's new sequence.
        replayed = await push_and_wait(ws_server, candidate, candidate_hash)
    assert replayed.remote_config_status.status == FAILED
    assert "older than sequence 4" in replayed.remote_config_status.error_message
    assert (state_dir / "config" / "collector.yaml").read_bytes() == CONFIG_V1["collector.yaml"].body
    assert FileState(state_dir).load_remote_config().signings == {"edge": AppliedSigning(4, stable_hash.hex())}


async def test_the_envelope_in_use_delivered_again_is_applied_as_a_re_delivery(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair, signed_settings: AgentSettings
) -> None:
    stable, stable_hash = signed_offer(CONFIG_V1, key=key, sequence=2)
    candidate, candidate_hash = signed_offer(CONFIG_V2, key=key, sequence=1, configuration="other")
    async with running(make_agent(ws_server.url, state_dir, signed_settings)):
        await ws_server.next_message()
        assert (await push_and_wait(ws_server, stable, stable_hash)).remote_config_status.status == APPLIED
        # Another hash in between, so the agent does not skip the repeat as already received.
        await push_and_wait(ws_server, candidate, candidate_hash)
        again = await push_and_wait(ws_server, stable, stable_hash)
    assert again.remote_config_status.status == APPLIED
    assert FileState(state_dir).load_remote_config().signings["edge"] == AppliedSigning(2, stable_hash.hex())


async def test_envelopes_signed_by_several_trusted_keys_keep_one_sequence(
    ws_server: FakeWebSocketServer, state_dir: Path, key: SigningKeyPair
) -> None:
    """Keys rotate: the sequence is the configuration's, whichever key signed."""
    next_key = SigningKeyPair.generate()
    settings = replace(QUIET, trusted_keys=trusted_keys_by_id([key.public_key, next_key.public_key]))
    first, first_hash = signed_offer(CONFIG_V1, key=key, sequence=5)
    second, second_hash = signed_offer(CONFIG_V2, key=next_key, sequence=6)
    replay, _ = signed_offer(CONFIG_V1, key=next_key, sequence=5)
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await ws_server.next_message()
        assert (await push_and_wait(ws_server, first, first_hash)).remote_config_status.status == APPLIED
        assert (await push_and_wait(ws_server, second, second_hash)).remote_config_status.status == APPLIED
        refused = await push_and_wait(ws_server, replay, first_hash)
    assert refused.remote_config_status.status == FAILED
    assert "older than sequence 6" in refused.remote_config_status.error_message


def test_a_record_of_signed_versions_loads_them_as_sequences(state_dir: Path) -> None:
    """Kept before sequences existed: the highest signed version is the sequence to beat."""
    state = FileState(state_dir)
    document = {
        "last_remote_config_hash": "",
        "status": "UNSET",
        "error_message": "",
        "applied_config_hash": "",
        "files": {},
        "signed_config_versions": {"edge": 7},
    }
    (state_dir / "remote_config.json").write_text(json.dumps(document), encoding="utf-8")
    record = state.load_remote_config()
    assert record.signings == {"edge": AppliedSigning(7)}
    state.save_remote_config(record)
    assert state.load_remote_config().signings == {"edge": AppliedSigning(7)}


async def test_the_capability_is_declared_in_full_reports_only_when_keys_are_configured(
    ws_server: FakeWebSocketServer, tmp_path: Path, signed_settings: AgentSettings
) -> None:
    async with running(make_agent(ws_server.url, tmp_path / "signed", signed_settings)):
        signed_first = await ws_server.next_message()
    await ws_server.next_message()  # disconnect
    async with running(make_agent(ws_server.url, tmp_path / "plain", QUIET)):
        plain_first = await ws_server.next_message()

    assert is_full_report(signed_first)
    assert list(signed_first.custom_capabilities.capabilities) == [CUSTOM_CAPABILITY]
    assert is_full_report(plain_first)
    assert not plain_first.HasField("custom_capabilities")


async def test_an_agent_without_keys_applies_a_plain_config(ws_server: FakeWebSocketServer, state_dir: Path) -> None:
    remote = remote_config(CONFIG_V1)
    async with running(make_agent(ws_server.url, state_dir, QUIET)):
        await ws_server.next_message()
        applied = await push_and_wait(ws_server, pb.ServerToAgent(remote_config=remote), remote.config_hash)
    assert applied.remote_config_status.status == APPLIED


def test_a_trusted_key_under_the_wrong_id_is_refused(key: SigningKeyPair) -> None:
    with pytest.raises(ValueError, match="wrong id"):
        AgentSettings(trusted_keys={"0000000000000000": key.public_key})


def test_an_empty_key_set_still_requires_signatures() -> None:
    settings = AgentSettings(trusted_keys={})
    assert settings.requires_signed_config
    assert settings.custom_capabilities == [CUSTOM_CAPABILITY]
    assert AgentSettings().custom_capabilities == []


def test_a_record_written_before_signed_configs_loads_with_no_signings(state_dir: Path) -> None:
    state = FileState(state_dir)
    document = {
        "last_remote_config_hash": "",
        "status": "UNSET",
        "error_message": "",
        "applied_config_hash": "",
        "files": {},
    }
    (state_dir / "remote_config.json").write_text(json.dumps(document), encoding="utf-8")
    assert state.load_remote_config().signings == {}


# --- command line -----------------------------------------------------------------------


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "--server", "ws://127.0.0.1:4320/v1/opamp", "--state-dir", "s", *args])


def write_public_key(path: Path, pair: SigningKeyPair) -> Path:
    path.write_text(pair.public_key_pem, encoding="ascii")
    return path


def test_without_trusted_key_flags_signatures_are_not_required() -> None:
    settings = settings_from_options(parse())
    assert settings.trusted_keys is None
    assert settings.custom_capabilities == []


def test_trusted_key_flags_are_repeatable_and_indexed_by_key_id(tmp_path: Path) -> None:
    first, second = SigningKeyPair.generate(), SigningKeyPair.generate()
    settings = settings_from_options(
        parse(
            "--trusted-key",
            str(write_public_key(tmp_path / "a.pem", first)),
            "--trusted-key",
            str(write_public_key(tmp_path / "b.pem", second)),
        )
    )
    assert settings.trusted_keys is not None
    assert set(settings.trusted_keys) == {first.key_id, second.key_id}
    assert settings.custom_capabilities == [CUSTOM_CAPABILITY]


def test_a_trusted_keys_dir_adds_every_pem_key_in_it(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    first, second, third = (SigningKeyPair.generate() for _ in range(3))
    write_public_key(keys_dir / "one.pem", first)
    write_public_key(keys_dir / "two.pem", second)
    extra = write_public_key(tmp_path / "three.pem", third)
    settings = settings_from_options(parse("--trusted-keys-dir", str(keys_dir), "--trusted-key", str(extra)))
    assert settings.trusted_keys is not None
    assert set(settings.trusted_keys) == {first.key_id, second.key_id, third.key_id}


def test_an_unreadable_or_wrong_trusted_key_file_is_a_usage_error(tmp_path: Path) -> None:
    not_a_key = tmp_path / "junk.pem"
    not_a_key.write_text("junk", encoding="ascii")
    with pytest.raises(SystemExit):
        parse("--trusted-key", str(tmp_path / "missing.pem"))
    with pytest.raises(SystemExit):
        parse("--trusted-key", str(not_a_key))


def test_a_trusted_keys_dir_without_keys_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse("--trusted-keys-dir", str(tmp_path))
    with pytest.raises(SystemExit):
        parse("--trusted-keys-dir", str(tmp_path / "missing"))
