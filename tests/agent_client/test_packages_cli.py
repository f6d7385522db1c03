"""Packages from the command line (`run --packages-dir`, `simulate --packages`) and over HTTP polling."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_client.cli import build_parser
from agent_client.cli_commands import settings_from_options, simulate_fleet
from agent_client.packages import PackageSettings
from agent_client.signed_config import trusted_keys_by_id
from agent_client.testing import FakeHttpServer
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.file_server import FileServer
from tests.agent_client.helpers import FAST, make_agent, running
from tests.agent_client.package_offers import INSTALLED, Offered, offer, until_processed


def test_run_accepts_packages_only_with_a_packages_directory(tmp_path: Path) -> None:
    base = ["run", "--server", "ws://127.0.0.1:4320/v1/opamp", "--state-dir", str(tmp_path)]
    without = settings_from_options(build_parser().parse_args(base))
    check = f"{sys.executable} -c 'import sys; sys.exit(sys.argv[1] != \"2\")' {{version}}"
    options = build_parser().parse_args(
        [*base, "--packages-dir", str(tmp_path / "packages"), "--package-start-check", check]
    )
    settings = settings_from_options(options)

    assert without.packages is None
    assert not without.capabilities & AgentCapabilities.ACCEPTS_PACKAGES
    assert settings.packages is not None
    assert settings.packages.directory == tmp_path / "packages"
    assert settings.capabilities & AgentCapabilities.ACCEPTS_PACKAGES
    assert settings.capabilities & AgentCapabilities.REPORTS_PACKAGE_STATUSES
    start_check = settings.packages.start_check
    assert start_check is not None
    assert start_check("otelcol", "2", tmp_path) is None
    assert start_check("otelcol", "3", tmp_path) == f"{sys.executable} exited with status 1"


def test_simulate_gives_a_share_of_the_agents_failing_installs() -> None:
    options = build_parser().parse_args(
        [
            "simulate",
            "--server",
            "ws://127.0.0.1:4320/v1/opamp",
            "--agents",
            "10",
            "--packages",
            "--package-fail-fraction",
            "0.3",
            "--package-skip-download-fraction",
            "0.5",
        ]
    )
    packages = [agent.settings.packages for agent in simulate_fleet(options).agents]

    assert all(p is not None and p.directory is None for p in packages)
    assert sum(p is not None and p.fail_install for p in packages) == 3
    assert sum(p is not None and not p.download for p in packages) == 5


def test_simulate_without_packages_declares_none() -> None:
    options = build_parser().parse_args(["simulate", "--server", "ws://127.0.0.1:4320/v1/opamp", "--agents", "2"])
    assert all(agent.settings.packages is None for agent in simulate_fleet(options).agents)


async def test_a_polling_agent_installs_and_reports_over_http(tmp_path: Path, state_dir: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with FileServer() as files, FakeHttpServer() as server:
        available = offer(files, key, Offered("otelcol", "2", b"binary"))
        offered = False

        def responder(message: pb.AgentToServer) -> pb.ServerToAgent:
            nonlocal offered
            reply = pb.ServerToAgent(instance_uid=message.instance_uid)
            if not offered:
                offered = True
                reply.packages_available.CopyFrom(available)
            return reply

        server.responder = responder
        settings = replace(
            FAST,
            trusted_keys=trusted_keys_by_id([key.public_key()]),
            packages=PackageSettings(directory=tmp_path / "packages", progress_interval=0.001),
        )
        async with running(make_agent(server.url, state_dir, settings)):
            reports = await until_processed(server, available)

    assert reports[-1].packages["otelcol"].status == INSTALLED
    assert (tmp_path / "packages" / "otelcol" / "current" / "otelcol").read_bytes() == b"binary"
