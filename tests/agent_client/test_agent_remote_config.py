"""Remote config: APPLYING then APPLIED or FAILED, files on disk, idempotency, drills."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from agent_client import Agent, ConfigFile, FileState, MemoryState, transport_for_url
from agent_client.remote_config import (
    EMPTY_NAME_FILE,
    FAIL_APPLY_REJECTED,
    ConfigRejected,
    check_remote_config,
    disk_name,
)
from agent_client.testing import FakeWebSocketServer
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import (
    FAST,
    QUIET,
    full_state_request,
    is_full_report,
    make_agent,
    remote_config,
    running,
)

APPLIED = pb.RemoteConfigStatuses_APPLIED
APPLYING = pb.RemoteConfigStatuses_APPLYING
FAILED = pb.RemoteConfigStatuses_FAILED

COLLECTOR_YAML = {"collector.yaml": ConfigFile(b"receivers: {otlp: {}}\n", "text/yaml")}


def offer(files: Mapping[str, ConfigFile]) -> tuple[pb.ServerToAgent, bytes]:
    remote = remote_config(files)
    return pb.ServerToAgent(remote_config=remote), remote.config_hash


async def apply(server: FakeWebSocketServer, files: Mapping[str, ConfigFile]) -> tuple[pb.AgentToServer, bytes]:
    """Push `files` and return the agent's terminal status report."""
    message, config_hash = offer(files)
    await server.push(message)
    applying = await server.next_message()
    assert applying.remote_config_status.status == APPLYING
    assert applying.remote_config_status.last_remote_config_hash == config_hash
    return await server.next_message(), config_hash


async def test_a_new_config_is_reported_applying_then_applied_with_its_hash_and_effective_config(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        applied, config_hash = await apply(ws_server, COLLECTOR_YAML)

    assert applied.remote_config_status.status == APPLIED
    assert applied.remote_config_status.last_remote_config_hash == config_hash
    assert applied.remote_config_status.error_message == ""
    effective = applied.effective_config.config_map.config_map
    assert dict(effective.items()).keys() == {"collector.yaml"}
    assert effective["collector.yaml"].body == b"receivers: {otlp: {}}\n"
    assert effective["collector.yaml"].content_type == "text/yaml"


async def test_applied_files_are_written_into_the_config_directory_and_the_hash_persisted(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    files = {**COLLECTOR_YAML, "extra.json": ConfigFile(b'{"a": 1}', "application/json")}
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        _, config_hash = await apply(ws_server, files)

    config_dir = state_dir / "config"
    assert sorted(path.name for path in config_dir.iterdir()) == ["collector.yaml", "extra.json"]
    assert (config_dir / "collector.yaml").read_bytes() == b"receivers: {otlp: {}}\n"
    record = FileState(state_dir).load_remote_config()
    assert record.applied_hash == config_hash
    assert record.status == APPLIED
    assert record.files == files


async def test_the_same_config_hash_again_changes_nothing(ws_server: FakeWebSocketServer, state_dir: Path) -> None:
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        await apply(ws_server, COLLECTOR_YAML)
        await ws_server.push(offer(COLLECTOR_YAML)[0])
        # Replies are handled in order: a second APPLYING would come before this answer.
        await ws_server.push(full_state_request())
        following = await ws_server.next_message()
    assert is_full_report(following)
    assert following.remote_config_status.status == APPLIED
    assert sum(message.remote_config_status.status == APPLYING for message in ws_server.messages) == 1


async def test_a_body_containing_the_marker_fails_with_the_marker_error(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    settings = replace(QUIET, fail_if_contains=b"BREAK-ME")
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await ws_server.next_message()
        failed, config_hash = await apply(ws_server, {"a.yaml": ConfigFile(b"x: BREAK-ME\n", "text/yaml")})

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message == "config rejected: contains marker BREAK-ME"
    assert failed.remote_config_status.last_remote_config_hash == config_hash
    assert not failed.HasField("effective_config")  # unchanged
    assert list((state_dir / "config").iterdir()) == []


async def test_a_config_without_the_marker_still_applies_under_the_marker_rule(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    settings = replace(QUIET, fail_if_contains=b"BREAK-ME")
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await ws_server.next_message()
        applied, _ = await apply(ws_server, COLLECTOR_YAML)
    assert applied.remote_config_status.status == APPLIED


@pytest.mark.parametrize("bad_name", ["../escape.yaml", "sub/dir.yaml", "..", ".hidden"])
async def test_a_bad_file_name_fails_the_apply_and_writes_nothing(
    ws_server: FakeWebSocketServer, state_dir: Path, bad_name: str
) -> None:
    files = {**COLLECTOR_YAML, bad_name: ConfigFile(b"x", "text/plain")}
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        failed, _ = await apply(ws_server, files)

    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message.startswith(f"invalid config file name {bad_name!r}")
    assert list((state_dir / "config").iterdir()) == []
    assert not (state_dir / "escape.yaml").exists()


async def test_fail_apply_fails_every_config(ws_server: FakeWebSocketServer, state_dir: Path) -> None:
    async with running(make_agent(ws_server.url, state_dir, replace(QUIET, fail_apply=True))):
        await ws_server.next_message()
        failed, _ = await apply(ws_server, COLLECTOR_YAML)
    assert failed.remote_config_status.status == FAILED
    assert failed.remote_config_status.error_message == FAIL_APPLY_REJECTED


async def test_an_empty_config_map_is_a_valid_config(ws_server: FakeWebSocketServer, state_dir: Path) -> None:
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        await apply(ws_server, COLLECTOR_YAML)
        applied, config_hash = await apply(ws_server, {})
    assert applied.remote_config_status.status == APPLIED
    assert applied.remote_config_status.last_remote_config_hash == config_hash
    assert len(applied.effective_config.config_map.config_map) == 0
    assert list((state_dir / "config").iterdir()) == []  # the previous config's file is gone


async def test_a_restarted_agent_reports_its_persisted_status_and_effective_config(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir)):
        await ws_server.next_message()
        _, config_hash = await apply(ws_server, COLLECTOR_YAML)
    await ws_server.next_message()  # disconnect
    async with running(make_agent(ws_server.url, state_dir)):
        first = await ws_server.next_message()
    assert first.remote_config_status.status == APPLIED
    assert first.remote_config_status.last_remote_config_hash == config_hash
    assert first.effective_config.config_map.config_map["collector.yaml"].body == b"receivers: {otlp: {}}\n"


async def test_a_rollback_to_the_applied_config_after_a_failure_is_applied_again(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    settings = replace(QUIET, fail_if_contains=b"BREAK-ME")
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await ws_server.next_message()
        await apply(ws_server, COLLECTOR_YAML)
        failed, _ = await apply(ws_server, {"collector.yaml": ConfigFile(b"BREAK-ME", "text/yaml")})
        assert failed.remote_config_status.status == FAILED
        rolled_back, stable_hash = await apply(ws_server, COLLECTOR_YAML)
    assert rolled_back.remote_config_status.status == APPLIED
    assert rolled_back.remote_config_status.last_remote_config_hash == stable_hash


async def test_a_remote_config_is_ignored_when_accepting_it_is_switched_off(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir, replace(QUIET, accept_remote_config=False))):
        await ws_server.next_message()
        await ws_server.push(offer(COLLECTOR_YAML)[0])
        await ws_server.push(full_state_request())
        following = await ws_server.next_message()
    assert is_full_report(following)
    assert following.remote_config_status.status == pb.RemoteConfigStatuses_UNSET
    assert list((state_dir / "config").iterdir()) == []


def test_the_empty_file_name_means_the_single_config_file() -> None:
    assert disk_name("") == EMPTY_NAME_FILE


def test_two_names_for_the_same_file_are_rejected() -> None:
    files = {"": ConfigFile(b"a"), EMPTY_NAME_FILE: ConfigFile(b"b")}
    with pytest.raises(ConfigRejected, match="map to the same file"):
        check_remote_config(files, fail_if_contains=None, fail_apply=False)


@pytest.mark.parametrize("name", ["a\\b", "nul\x00byte", "x" * 256])
def test_names_with_backslashes_control_characters_or_excess_length_are_rejected(name: str) -> None:
    with pytest.raises(ConfigRejected, match="invalid config file name"):
        disk_name(name)


class SlowInstallState(MemoryState):
    """Holds every install until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.installing = threading.Event()
        self.release = threading.Event()

    def install_config(self, files: Mapping[str, ConfigFile]) -> None:
        self.installing.set()
        self.release.wait(timeout=5)
        super().install_config(files)


async def test_a_connection_lost_mid_apply_reports_the_previous_outcome_so_the_offer_is_repeated(
    ws_server: FakeWebSocketServer,
) -> None:
    state = SlowInstallState()
    agent = Agent(transport=transport_for_url(ws_server.url, trust_env=False), state=state, settings=FAST)
    async with running(agent):
        try:
            await ws_server.next_message()
            await ws_server.push(offer(COLLECTOR_YAML)[0])
            await ws_server.next_matching(lambda message: message.remote_config_status.status == APPLYING)
            assert await asyncio.to_thread(state.installing.wait, 2)
            await ws_server.drop_connection()
            reconnected = await ws_server.next_matching(is_full_report)
        finally:
            state.release.set()
    assert reconnected.remote_config_status.status == pb.RemoteConfigStatuses_UNSET
    assert reconnected.remote_config_status.last_remote_config_hash == b""
