"""Package rollouts end to end: a real server process (daphne) signing package files, a real
Celery worker with beat advancing the rollout, and `agent_client run --packages-dir` agents
over WebSocket and plain HTTP that trust the server's signing key.

Every agent runs version 1.0.0 of a package (assigned by selector). Version 2.0.0 is uploaded
and rolled out in two stages with short holds:

- a good file: every agent ends with 2.0.0 installed and reported, the assignment names it;
- a file whose stored bytes no longer match the hash recorded at upload, and a file signed
  by a key the agents do not trust: the agents of the first stage refuse it (InstallFailed),
  the stage fails its budget, beat rolls the rollout back, and every agent reports 1.0.0
  installed; the rollout still counts those agents failed, with their refusal
  (`rollout_watch` lists them).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opamp.package_signature import PackageEnvelope, sign_package_file
from signing.config_signing import SigningKeyPair, generate_signing_key
from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess, agent_client_run

pytestmark = [pytest.mark.live_server]

TRANSPORTS = ("ws", "ws", "http", "http")
V1 = b"#!/bin/sh\necho 1.0.0\n" + b"1" * 50_000
V2 = b"#!/bin/sh\necho 2.0.0\n" + b"2" * 50_000
# Two agents first, then the rest; holds compressed to a second.
STAGES = [{"count": 2, "hold_seconds": 1}, {"percent": 100, "hold_seconds": 1}]


class PackageFleet:
    def __init__(self, server: LiveOpampServer, root: Path, public_key: Path, service: str) -> None:
        self.server, self.root, self.public_key, self.service = server, root, public_key, service
        self.processes: list[AgentProcess] = []

    def start(self) -> None:
        for index, kind in enumerate(TRANSPORTS):
            url = self.server.ws_url if kind == "ws" else self.server.http_url
            name = f"{self.service}-{index}"
            command = agent_client_run(
                url,
                self.root / name / "state",
                "--packages-dir",
                str(self.root / name / "packages"),
                "--attr",
                f"service.name={self.service}",
                "--attr",
                f"host.name={name}",
                "--heartbeat",
                "1",
                "--trusted-key",
                str(self.public_key),
            )
            self.processes.append(AgentProcess(command, self.root / "logs", name=name, env=dict(os.environ)))

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def output(self) -> str:
        return "\n".join(process.output() for process in self.processes)

    def installed_on_disk(self, package: str) -> list[str]:
        return [
            os.readlink(self.root / process.name / "packages" / package / "current")
            if (self.root / process.name / "packages" / package / "current").is_symlink()
            else ""
            for process in self.processes
        ]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveOpampServer, Path]]:
    root = tmp_path_factory.mktemp("package-rollout")
    pair = generate_signing_key(root / "signing-key.pem")
    public_key = root / "trusted.pem"
    public_key.write_text(pair.public_key_pem)
    server = LiveOpampServer(
        root / "server",
        extra_env={"OPAMP_SIGNING_KEY_FILE": str(root / "signing-key.pem"), "OPAMP_ROLLOUT_TICK_SECONDS": "1"},
    )
    server.start()
    server.start_celery()
    try:
        yield server, public_key
    finally:
        server.close()


@pytest.fixture
def fleet(live, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LiveOpampServer, PackageFleet]]:
    server, public_key = live
    service = f"pkg-{secrets.token_hex(3)}"
    agents = PackageFleet(server, tmp_path / "agents", public_key, service)
    try:
        yield server, agents
    finally:
        agents.stop()


def statuses(server: LiveOpampServer, fleet: PackageFleet, package: str) -> list[dict[str, Any]]:
    rows = server.agents(attribute=f"service.name={fleet.service}")
    found = []
    for row in rows:
        detail = server.api(f"agents/{row['instance_uid']}/")
        found.append(((detail.get("package_statuses") or {}).get("packages") or {}).get(package) or {})
    return found


def every_agent_installed(server: LiveOpampServer, fleet: PackageFleet, package: str, version: str) -> bool:
    found = statuses(server, fleet, package)
    return len(found) == len(TRANSPORTS) and all(
        (s.get("status"), s.get("agent_has_version")) == ("Installed", version) for s in found
    )


def wait(server: LiveOpampServer, fleet: PackageFleet, predicate: Any, *, what: str, timeout: float = 90) -> Any:
    try:
        return server.wait_for(predicate, timeout=timeout, interval=0.5, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{server.celery_log()[-3000:]}\n{fleet.output()}") from None


def on_version_one(server: LiveOpampServer, fleet: PackageFleet) -> str:
    """The package at 1.0.0 assigned to the fleet's agents, installed by every one of them."""
    package = fleet.service
    server.api_post("packages/", {"name": package, "type": "top_level"})
    server.upload_package(package, "1.0.0", V1)
    server.api_post(
        "package-assignments/",
        {"name": package, "package": package, "version": "1.0.0", "selector": f"service.name={fleet.service}"},
    )
    fleet.start()
    wait(server, fleet, lambda: every_agent_installed(server, fleet, package, "1.0.0"), what="every agent on 1.0.0")
    return package


def start_rollout(server: LiveOpampServer, package: str) -> dict[str, Any]:
    rollout = server.api_post(
        "rollouts/",
        {
            "package": package,
            "candidate_version": "2.0.0",
            "stages": STAGES,
            "max_failure_rate": 0.2,
            "apply_timeout_seconds": 60,
        },
    )
    assert (rollout["kind"], rollout["stable_version"], rollout["candidate_version"]) == ("package", "1.0.0", "2.0.0")
    server.api_post(f"rollouts/{rollout['id']}/start/", {})
    return dict(rollout)


def state_of(server: LiveOpampServer, rollout: dict[str, Any]) -> str:
    return str(server.api(f"rollouts/{rollout['id']}/")["state"])


def test_version_two_rolled_out_in_stages_reaches_every_agent(fleet):
    server, agents = fleet
    package = on_version_one(server, agents)
    server.upload_package(package, "2.0.0", V2)
    rollout = start_rollout(server, package)

    wait(server, agents, lambda: state_of(server, rollout) == "succeeded", what="the rollout succeeded")
    wait(server, agents, lambda: every_agent_installed(server, agents, package, "2.0.0"), what="every agent on 2.0.0")
    assert agents.installed_on_disk(package) == ["2.0.0"] * len(TRANSPORTS)
    events = server.api(f"rollouts/{rollout['id']}/events/")
    assert [e["stage_index"] for e in events if e["kind"] == "stage_started"] == [1], events
    finished = server.api(f"rollouts/{rollout['id']}/")
    first = finished["stages"][0]["counts"]
    assert (first["targeted"], first["applied"], first["failed"]) == (2, 2, 0), finished["stages"]
    assert server.api(f"package-assignments/{package}/")["version"] == "2.0.0"
    summary = server.api(f"packages/{package}/status/")["versions"]
    assert summary["2.0.0"]["installed"] == len(TRANSPORTS) and "1.0.0" not in summary, summary


def refused_then_rolled_back(server: LiveOpampServer, agents: PackageFleet, package: str, refusal: str) -> None:
    rollout = start_rollout(server, package)
    wait(
        server,
        agents,
        lambda: state_of(server, rollout) in {"rolling_back", "rolled_back"},
        what="beat rolled the rollout back",
    )
    events = server.api(f"rollouts/{rollout['id']}/events/")
    breach = [e for e in events if e["kind"] == "budget_exceeded"]
    assert breach and breach[0]["stage_index"] == 0, events
    assert breach[0]["counts"]["failed"] >= 1, breach
    wait(server, agents, lambda: state_of(server, rollout) == "rolled_back", what="rolled back")
    wait(server, agents, lambda: every_agent_installed(server, agents, package, "1.0.0"), what="every agent on 1.0.0")
    assert agents.installed_on_disk(package) == ["1.0.0"] * len(TRANSPORTS)
    logs = agents.output()
    assert refusal in logs, logs
    assert f"package {package} 2.0.0 installed" not in logs
    assert server.api(f"package-assignments/{package}/")["version"] == "1.0.0"
    # Every agent reports 1.0.0 again, yet the rollout still counts and names the refusals
    # that rolled it back (recorded on its targets when the agents reported them).
    stages = server.api(f"rollouts/{rollout['id']}/")["stages"]
    assert stages[0]["counts"]["failed"] >= 1, stages
    watched = server.manage("rollout_watch", str(rollout["id"]), exit_status=3)
    failed = [line for line in watched.splitlines() if line.startswith("  failed: ")]
    assert failed and all(refusal in line for line in failed), watched


def test_a_file_with_a_wrong_hash_is_refused_and_rolled_back(fleet):
    server, agents = fleet
    package = on_version_one(server, agents)
    uploaded = server.upload_package(package, "2.0.0", V2)
    # The stored bytes change after the upload: the served file no longer has the hash
    # (nor the signature) recorded for it.
    tampered = V2[:-1] + b"X"
    server.manage(
        "shell",
        "-c",
        "from rollouts.models import PackageFile\n"
        "from rollouts.package_files import package_storage\n"
        f"row = PackageFile.objects.get(pk={uploaded['id']})\n"
        "with open(package_storage().path(row.storage_name), 'wb') as stored:\n"
        f"    stored.write({tampered!r})\n",
    )
    refused_then_rolled_back(server, agents, package, "the file hashes to")


def test_a_file_signed_by_an_untrusted_key_is_refused_and_rolled_back(fleet, tmp_path):
    server, agents = fleet
    package = on_version_one(server, agents)
    uploaded = server.upload_package(package, "2.0.0", V2)
    # The file is intact, but its signature is by a key the agents do not trust.
    stranger = SigningKeyPair.generate()
    envelope = PackageEnvelope(package=package, version="2.0.0", sha256=uploaded["sha256"], key_id=stranger.key_id)
    document = sign_package_file(envelope, stranger.private_key.sign).to_json_bytes().decode("ascii")
    server.manage(
        "shell",
        "-c",
        "from rollouts.models import PackageFile\n"
        f"PackageFile.objects.filter(pk={uploaded['id']}).update(signature={json.dumps(document)}, "
        f"key_id={stranger.key_id!r})\n",
    )
    refused_then_rolled_back(
        server, agents, package, f"signed with key {stranger.key_id}, which this agent does not trust"
    )
