"""The command line: flags become settings, and a signal ends the agent with a goodbye."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from agent_client.cli import build_parser, parse_header, parse_key_value, settings_from_options
from agent_client.testing import FakeWebSocketServer
from opamp.capabilities import AgentCapabilities
from tests.agent_client.helpers import is_full_report

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "--server", "ws://127.0.0.1:4320/v1/opamp", "--state-dir", "s", *args])


def test_attr_and_label_flags_become_identifying_and_non_identifying_attributes() -> None:
    settings = settings_from_options(
        parse("--attr", "service.name=edge", "--attr", "team=obs=core", "--label", "deployment.environment=dev")
    )
    assert settings.identifying_attributes == {"service.name": "edge", "team": "obs=core"}
    assert settings.non_identifying_attributes == {"deployment.environment": "dev"}


def test_drill_flags_and_heartbeat_reach_the_settings() -> None:
    settings = settings_from_options(
        parse("--fail-if-contains", "BREAK-ME", "--fail-apply", "--heartbeat", "2.5", "--no-accept-remote-config")
    )
    assert settings.fail_if_contains == b"BREAK-ME"
    assert settings.fail_apply is True
    assert settings.heartbeat_interval == 2.5
    assert not settings.capabilities & AgentCapabilities.ACCEPTS_REMOTE_CONFIG


def test_defaults_heartbeat_every_30_seconds_and_accept_remote_config() -> None:
    settings = settings_from_options(parse())
    assert settings.heartbeat_interval == 30.0
    assert settings.capabilities & AgentCapabilities.ACCEPTS_REMOTE_CONFIG
    assert settings.fail_if_contains is None


@pytest.mark.parametrize("text", ["novalue", "=value", ""])
def test_a_malformed_key_value_is_rejected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_key_value(text)


def test_a_header_flag_is_split_at_the_first_colon() -> None:
    assert parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_header("no colon here")


async def test_the_cli_runs_until_sigterm_then_disconnects_and_exits_cleanly(
    ws_server: FakeWebSocketServer, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_client",
        "run",
        "--server",
        ws_server.url,
        "--state-dir",
        str(tmp_path / "state"),
        "--attr",
        "service.name=cli-test",
        "--header",
        "Authorization: Bearer s3cret",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        first = await ws_server.next_message(timeout=10)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    log = stderr.decode()
    assert process.returncode == 0, log
    assert is_full_report(first)
    assert ws_server.messages[-1].HasField("agent_disconnect")
    assert ws_server.request_headers[0]["Authorization"] == "Bearer s3cret"
    assert "connected to ws://127.0.0.1" in log
    assert "received SIGTERM, disconnecting" in log
    assert "s3cret" not in log
    assert (tmp_path / "state" / "instance_uid").exists()
