"""An agent in supervisor mode: its managed process is its health, a Restart restarts the process,
and a new package version is started on, or switched back from when its process does not start."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_client import AgentSettings, ConfigFile
from agent_client.cli import build_parser, main
from agent_client.cli_commands import EXIT_USAGE, settings_from_options
from agent_client.managed_process import ManagedProcessSettings
from agent_client.packages import PackageSettings, PackageStore
from agent_client.signed_config import trusted_keys_by_id
from agent_client.testing import FakeWebSocketServer
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.file_server import FileServer
from tests.agent_client.helpers import QUIET, is_full_report, make_agent, remote_config, running
from tests.agent_client.managed_children import (
    CRASHING,
    RUNNING,
    child_script,
    eventually,
    gone,
    started_pids,
    write_child,
)
from tests.agent_client.package_offers import FAILED, INSTALLED, Offered, offer, until_processed
from tests.agent_client.test_agent_restart import Restarts, restart


def managed(command: Path | str, **options: object) -> ManagedProcessSettings:
    values: dict[str, object] = {
        "start_check_seconds": 2.0,  # a loaded machine's Python start-up fits in many times over
        "stop_grace_seconds": 2.0,
        "backoff_initial": 0.1,
        "backoff_max": 0.4,
    }
    return ManagedProcessSettings(command=(str(command),), **{**values, **options})  # type: ignore[arg-type]


def has_health(message: pb.AgentToServer) -> bool:
    return message.HasField("health")


def pid_of(health: pb.ComponentHealth) -> int | None:
    pids = [kv.value.int_value for kv in health.attributes if kv.key == "process.pid"]
    return pids[0] if pids else None


async def test_the_agent_reports_its_managed_process_as_its_health_and_stops_it_with_itself(
    ws_server: FakeWebSocketServer, state_dir: Path, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    settings = replace(QUIET, managed=managed(write_child(tmp_path / "collector", pids, RUNNING)))
    agent = make_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        first = await ws_server.next_matching(lambda m: is_full_report(m) and m.health.healthy)
        assert agent.managed_process is not None
        await eventually(lambda: started_pids(pids), what="the first start")
        assert pid_of(first.health) == agent.managed_process.pid == started_pids(pids)[0]
        assert first.health.status == "running" and first.health.start_time_unix_nano > 0
    assert gone(started_pids(pids)[0])


async def test_a_restart_command_restarts_the_managed_process_not_the_agent(
    ws_server: FakeWebSocketServer, state_dir: Path, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    observer = Restarts()
    settings = replace(QUIET, managed=managed(write_child(tmp_path / "collector", pids, RUNNING)))
    agent = make_agent(ws_server.url, state_dir, settings, observer=observer)
    async with running(agent):
        first = await ws_server.next_matching(lambda m: is_full_report(m) and m.health.healthy)
        await eventually(lambda: started_pids(pids), what="the first start")  # its script ran
        await ws_server.push(restart())
        after = await ws_server.next_matching(
            lambda m: has_health(m) and m.health.healthy and pid_of(m.health) != pid_of(first.health)
        )
        assert not is_full_report(after)  # the same session goes on: no reconnect, no full report
        assert after.sequence_num > first.sequence_num
        assert after.health.start_time_unix_nano > first.health.start_time_unix_nano
        await eventually(lambda: len(started_pids(pids)) == 2, what="the second start")
        assert pid_of(after.health) == started_pids(pids)[1]
        first_pid = pid_of(first.health)
        assert first_pid is not None and gone(first_pid)
        assert len(ws_server.connection_times) == 1
        assert not any(m.HasField("agent_disconnect") for m in ws_server.messages)
    assert agent.restarts == 1 and observer.count == 1
    assert len(started_pids(pids)) == 2


async def test_an_exit_of_the_managed_process_is_reported_and_the_process_started_again(
    ws_server: FakeWebSocketServer, state_dir: Path, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    settings = replace(QUIET, managed=managed(write_child(tmp_path / "collector", pids, CRASHING)))
    async with running(make_agent(ws_server.url, state_dir, settings)):
        failed = await ws_server.next_matching(lambda m: has_health(m) and m.health.status == "exited")
        await eventually(lambda: len(started_pids(pids)) >= 3, what="two restarts")
    assert not failed.health.healthy
    assert failed.health.last_error == "the process exited with status 1"
    assert failed.health.start_time_unix_nano > 0 and pid_of(failed.health) is None


async def test_an_applied_config_restarts_the_managed_process_which_reads_it(
    ws_server: FakeWebSocketServer, state_dir: Path, tmp_path: Path
) -> None:
    pids, seen = tmp_path / "pids", tmp_path / "seen"
    config_file = state_dir / "config" / "collector.yaml"
    # The "collector" notes the config file it found at its start ("-" for none).
    reads = f"open({str(seen)!r}, 'a').write(open(sys.argv[1]).read() if os.path.exists(sys.argv[1]) else '-\\n')"
    program = write_child(tmp_path / "collector", pids, f"{reads}\n{RUNNING}")
    settings = replace(QUIET, managed=replace(managed(program), command=(str(program), str(config_file))))
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await ws_server.next_matching(is_full_report)
        await eventually(lambda: seen.exists(), what="the first start")
        await ws_server.push(pb.ServerToAgent(remote_config=remote_config({"collector.yaml": ConfigFile(b"a: 1\n")})))
        applied = await ws_server.next_matching(
            lambda m: m.remote_config_status.status == pb.RemoteConfigStatuses_APPLIED
        )
        await eventually(lambda: len(started_pids(pids)) == 2, what="the restart on the new config")
        await eventually(lambda: seen.read_text() == "-\na: 1\n", what="the restarted process reading the config")
    assert applied.effective_config.config_map.config_map["collector.yaml"].body == b"a: 1\n"


# -- packages -------------------------------------------------------------------------------


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def package_settings(key: Ed25519PrivateKey, tmp_path: Path) -> AgentSettings:
    directory = tmp_path / "packages"
    packages = PackageSettings(directory=directory, progress_interval=0.001, retry_delay=0.0)
    return replace(
        QUIET,
        trusted_keys=trusted_keys_by_id([key.public_key()]),
        packages=packages,
        managed=managed(directory / "otelcol" / "current" / "otelcol", package="otelcol"),
    )


async def test_a_new_version_is_started_on_and_one_whose_process_fails_is_switched_back_from(
    ws_server: FakeWebSocketServer, state_dir: Path, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    pids = tmp_path / "pids"
    settings = package_settings(key, tmp_path)
    store = PackageStore(tmp_path / "packages")
    async with FileServer() as files:
        v1 = offer(files, key, Offered("otelcol", "1", child_script(pids, RUNNING)))
        v2 = offer(files, key, Offered("otelcol", "2", child_script(pids, CRASHING)))
        agent = make_agent(ws_server.url, state_dir, settings)
        async with running(agent):
            first = await ws_server.next_matching(is_full_report)
            # Nothing installed yet: the process cannot start, and the agent says so.
            assert not first.health.healthy
            await ws_server.push(pb.ServerToAgent(packages_available=v1))
            assert (await until_processed(ws_server, v1))[-1].packages["otelcol"].status == INSTALLED
            await eventually(lambda: started_pids(pids), what="the start on 1")
            on_v1 = started_pids(pids)
            assert len(on_v1) == 1 and agent.managed_process is not None
            assert agent.managed_process.pid == on_v1[0]

            await ws_server.push(pb.ServerToAgent(packages_available=v2))
            reports = await until_processed(ws_server, v2)
            status = reports[-1].packages["otelcol"]
            assert status.status == FAILED
            assert status.error_message == (
                "start check failed: the process exited with status 1 within 2 s of its start; reverted to 1"
            )
            assert (status.agent_has_version, status.server_offered_version) == ("1", "2")
            assert store.current_version("otelcol") == "1" and store.versions("otelcol") == {"1"}
            # Started on 2 (which exited), then on 1 again, which runs.
            await eventually(lambda: len(started_pids(pids)) == 3, what="the start on 1 again")
            assert gone(on_v1[0])
            assert agent.managed_process.pid == started_pids(pids)[2]
            # Reported as it happens (before or after the package's status).
            await eventually(
                lambda: (
                    [pid_of(m.health) for m in ws_server.messages if has_health(m) and m.health.healthy][-1:]
                    == started_pids(pids)[2:]
                ),
                what="the start on 1 again reported",
            )
            assert agent.packages.installed["otelcol"].version == "1"


async def test_a_failed_first_version_leaves_the_process_stopped(
    ws_server: FakeWebSocketServer, state_dir: Path, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    pids = tmp_path / "pids"
    settings = package_settings(key, tmp_path)
    async with FileServer() as files:
        v1 = offer(files, key, Offered("otelcol", "1", child_script(pids, CRASHING)))
        agent = make_agent(ws_server.url, state_dir, settings)
        async with running(agent):
            await ws_server.next_matching(is_full_report)
            await ws_server.push(pb.ServerToAgent(packages_available=v1))
            status = (await until_processed(ws_server, v1))[-1].packages["otelcol"]
            # The health report may come before the package's: both are in what was sent.
            stopped = [m.health for m in ws_server.messages if has_health(m) and m.health.status == "stopped"]
    assert status.status == FAILED and status.error_message.endswith("; no previous version to revert to")
    assert [health.last_error for health in stopped] == ["package otelcol has no version to run"]
    assert len(started_pids(pids)) == 1


# -- the command line -----------------------------------------------------------------------


def test_run_takes_a_managed_command_template(tmp_path: Path) -> None:
    base = ["run", "--server", "ws://127.0.0.1:4320/v1/opamp", "--state-dir", str(tmp_path / "state")]
    managed_options = [
        "--packages-dir",
        str(tmp_path / "packages"),
        "--managed-package",
        "otelcol",
        "--managed-command",
        "{current}/otelcol --config '{config_dir}/collector.yaml'",
        "--managed-start-check",
        "7",
    ]
    settings = settings_from_options(build_parser().parse_args([*base, *managed_options]))
    assert settings.managed == ManagedProcessSettings(
        command=(
            f"{tmp_path}/packages/otelcol/current/otelcol",
            "--config",
            f"{tmp_path}/state/config/collector.yaml",
        ),
        package="otelcol",
        start_check_seconds=7.0,
    )
    assert settings_from_options(build_parser().parse_args(base)).managed is None


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--managed-command", "{current}/otelcol"], "{current} needs the package the process runs from"),
        (["--managed-command", "{binary}"], "unknown placeholder {binary}"),
        (["--managed-package", "otelcol", "--managed-command", "x"], "--managed-package needs --packages-dir"),
        (["--managed-package", "otelcol"], "--managed-package needs --managed-command"),
    ],
)
def test_run_refuses_a_managed_command_it_cannot_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, options: list[str], problem: str
) -> None:
    argv = ["run", "--server", "ws://127.0.0.1:4320/v1/opamp", "--state-dir", str(tmp_path), *options]
    assert main(argv) == EXIT_USAGE
    assert problem in caplog.text
