"""The command line: flags become settings, and a signal ends the agent with a goodbye."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from agent_client.cli import build_parser, parse_header, parse_key_value
from agent_client.cli_commands import settings_from_options
from agent_client.testing import FakeWebSocketServer
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import is_full_report
from tests.agent_client.pki import TOKEN, EnrollingServer, new_ca, pem

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


# --- enroll and the credential flags ----------------------------------------------------


def test_run_takes_a_token_a_ca_file_and_a_key_type(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("placeholder\n")
    options = parse("--token", TOKEN, "--ca-file", str(ca_file), "--key-type", "ed25519")
    settings = settings_from_options(options)
    assert options.ca_file == ca_file
    assert settings.enrollment.token == TOKEN
    assert settings.enrollment.key_type == "ed25519"
    # Given to `run`, the token goes along with the certificate too.
    assert settings.enrollment.send_token_with_certificate is True
    assert TOKEN not in repr(settings)


def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    token_path = tmp_path / "token"
    token_path.write_text(f"{TOKEN}\n")
    assert parse("--token-file", str(token_path)).token == TOKEN


async def run_cli(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_client",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def has_csr(message: pb.AgentToServer) -> bool:
    return message.HasField("connection_settings_request")


async def test_enroll_stores_the_certificate_with_0600_files_and_exits_0(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = EnrollingServer(new_ca())
    async with FakeWebSocketServer(server) as ws_server:
        code, stdout, stderr = await run_cli(
            "enroll", "--server", ws_server.url, "--token", TOKEN, "--state-dir", str(state), "--timeout", "10"
        )
    assert code == 0, stderr
    uid = (state / "instance_uid").read_text().strip()
    assert f"agent {uid} enrolled: certificate installed" in stdout
    assert ws_server.request_headers[0]["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in stderr + stdout
    assert "PRIVATE KEY" not in stderr + stdout
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("client.key", "client.crt", "ca.crt"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert (state / "client.crt").read_bytes() == pem(server.issued[0])
    assert not (state / "pending.key").exists()
    # Enrolling does not take configs on the way.
    assert not ws_server.messages[0].capabilities & AgentCapabilities.ACCEPTS_REMOTE_CONFIG

    # Enrolled: a second run has nothing to do and does not connect.
    code, stdout, _ = await run_cli(
        "enroll", "--server", "ws://127.0.0.1:1/v1/opamp", "--token", TOKEN, "--state-dir", str(state)
    )
    assert code == 0
    assert "already holds a certificate not due for renewal" in stdout


async def test_enroll_exits_3_while_pending_and_resends_the_same_request_after_approval(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = EnrollingServer(new_ca(), auto_approve=False)
    args = ["enroll", "--token", TOKEN, "--state-dir", str(state), "--timeout", "1.5"]
    async with FakeWebSocketServer(server) as ws_server:
        code, _, stderr = await run_cli(*args, "--server", ws_server.url)
    assert code == 3, stderr
    assert "pending approval" in stderr
    assert "run this command again" in stderr
    assert stat.S_IMODE((state / "pending.key").stat().st_mode) == 0o600
    assert not (state / "client.crt").exists()

    server.auto_approve = True
    async with FakeWebSocketServer(server) as ws_server:
        code, stdout, stderr = await run_cli(*args, "--server", ws_server.url)
        resent = next(message for message in ws_server.messages if has_csr(message))
    assert code == 0, stderr
    assert "enrolled" in stdout
    assert resent.connection_settings_request.opamp.certificate_request.csr == server.csrs[0]
    assert (state / "client.crt").exists()


async def test_enroll_reports_a_refused_credential_with_its_own_exit_status(tmp_path: Path) -> None:
    def forbidden(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(403, "no\n")

    async with FakeWebSocketServer(process_request=forbidden) as ws_server:
        code, _, stderr = await run_cli(
            "enroll", "--server", ws_server.url, "--token", TOKEN, "--state-dir", str(tmp_path / "s"), "--timeout", "10"
        )
    assert code == 4, stderr
    assert "error: server refused the credential (401/403): the server answered HTTP 403" in stderr
    assert TOKEN not in stderr


async def test_enroll_reports_a_refused_request_with_the_servers_reason(tmp_path: Path) -> None:
    def refuse(message: pb.AgentToServer) -> pb.ServerToAgent:
        if has_csr(message):
            return pb.ServerToAgent(
                instance_uid=message.instance_uid,
                error_response=pb.ServerErrorResponse(
                    type=pb.ServerErrorResponseType_BadRequest, error_message="enrollment token used up"
                ),
            )
        return EnrollingServer(new_ca())(message)

    async with FakeWebSocketServer(refuse) as ws_server:
        code, _, stderr = await run_cli(
            "enroll", "--server", ws_server.url, "--token", TOKEN, "--state-dir", str(tmp_path / "s"), "--timeout", "10"
        )
    assert code == 5, stderr
    assert "error: the server refused the certificate request: enrollment token used up" in stderr


async def test_enroll_without_a_token_or_certificate_is_a_usage_error(tmp_path: Path) -> None:
    code, _, stderr = await run_cli("enroll", "--server", "ws://127.0.0.1:1/v1/opamp", "--state-dir", str(tmp_path))
    assert code == 2
    assert "enroll needs --token" in stderr


async def test_run_with_a_token_enrolls_inline_and_reconnects(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = EnrollingServer(new_ca())
    async with FakeWebSocketServer(server) as ws_server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent_client",
            "run",
            "--server",
            ws_server.url,
            "--state-dir",
            str(state),
            "--token",
            TOKEN,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            # The report, the request, APPLIED, the goodbye, and the report of the new connection.
            await ws_server.next_matching(lambda message: message.HasField("connection_settings_status"), timeout=10)
            await ws_server.next_matching(is_full_report, timeout=10)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    log = stderr.decode()
    assert process.returncode == 0, log
    assert "certificate installed" in log
    assert "reconnecting to present the new client certificate" in log
    assert len(ws_server.connection_times) == 2
    assert (state / "client.crt").exists()
    assert TOKEN not in log
