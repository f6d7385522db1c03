"""Rollback end to end for agents that verify signatures: a real server process, a real
Celery worker with beat, and `agent_client run --trusted-key` agents.

The configuration has versions 1 and 2 (stable) and a candidate 3. The agents apply the
candidate, then the rollout is aborted, or its failure budget is exceeded and beat rolls it
back: every agent must return to the stable version and report it APPLIED. The stable
content is older than the candidate, so this only works when what the agent checks for
freshness is the signing sequence, not the content's version number.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from signing.config_signing import generate_signing_key
from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess, agent_client_run

pytestmark = [pytest.mark.live_server]

AGENTS = 3
MARKER = "signed-candidate-marker"
V1 = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
V2 = {"collector.yaml": {"body": "receivers:\n  otlp: {}\nexporters: {}\n", "content_type": "text/yaml"}}
CANDIDATE = {"collector.yaml": {"body": f"# {MARKER}\nreceivers:\n  otlp: {{}}\n", "content_type": "text/yaml"}}


class SignedFleet:
    def __init__(self, server: LiveOpampServer, root: Path, public_key: Path) -> None:
        self.server = server
        self.root = root
        self.public_key = public_key
        self.processes: list[AgentProcess] = []

    def start(self, service: str, *, failing: Collection[int] = ()) -> None:
        for index in range(AGENTS):
            command = agent_client_run(
                self.server.ws_url,
                self.root / f"agent-{index}",
                "--attr",
                f"service.name={service}",
                "--attr",
                f"host.name={service}-{index}",
                "--heartbeat",
                "1",
                "--trusted-key",
                str(self.public_key),
            )
            if index in failing:
                command += ["--fail-if-contains", MARKER]
            self.processes.append(
                AgentProcess(command, self.root / "logs", name=f"{service}-{index}", env=dict(os.environ))
            )

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def output(self) -> str:
        return "\n".join(process.output() for process in self.processes)

    def refusals(self) -> list[str]:
        """Every signature refusal the agents logged (a replay refusal among them)."""
        return [
            line
            for process in self.processes
            for line in process.stderr_path.read_text(errors="replace").splitlines()
            if "signature refused" in line
        ]


@pytest.fixture(scope="module")
def live_signing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveOpampServer, Path]]:
    """One server and Celery worker for the module (each test uses a configuration and
    agents of its own), signing with a key its agents trust."""
    root = tmp_path_factory.mktemp("signed-rollback")
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
def signed_server(live_signing_server, tmp_path: Path) -> Iterator[tuple[LiveOpampServer, SignedFleet]]:
    server, public_key = live_signing_server
    fleet = SignedFleet(server, tmp_path / "agents", public_key)
    try:
        yield server, fleet
    finally:
        fleet.stop()


def config_states(server: LiveOpampServer, service: str) -> list[dict[str, Any]]:
    uids = [agent["instance_uid"] for agent in server.agents(attribute=f"service.name={service}")]
    return [server.api(f"agents/{uid}/config/") for uid in uids]


def every_agent(server: LiveOpampServer, service: str, *, state: str, config_hash: str) -> bool:
    states = config_states(server, service)
    return len(states) == AGENTS and all(s["state"] == state and s["reported_hash"] == config_hash for s in states)


def prepare(
    server: LiveOpampServer, fleet: SignedFleet, service: str, failing: Collection[int]
) -> tuple[str, str, dict]:
    """Versions 1 and 2 published (2 is stable), candidate 3 stored; the agents run version 2."""
    server.api_post("configurations/", {"name": service, "selector": f"service.name={service}"})
    server.api_post(f"configurations/{service}/versions/", {"files": V1})
    stable = server.api_post(f"configurations/{service}/versions/", {"files": V2})
    candidate = server.api_post(f"configurations/{service}/versions/", {"files": CANDIDATE, "activate": False})
    assert (stable["number"], candidate["number"]) == (2, 3)
    fleet.start(service, failing=failing)
    try:
        server.wait_for(
            lambda: every_agent(server, service, state="applied", config_hash=stable["config_hash"]),
            timeout=60,
            what="every agent applied the signed stable version",
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{fleet.output()}") from None
    return service, stable["config_hash"], candidate


# The last stage is held long enough that only an abort or the budget can end it.
ONE_STAGE = [{"percent": 100, "hold_seconds": 600}]


def start_rollout(
    server: LiveOpampServer, name: str, candidate: dict, *, max_failure_rate: float, stages: list
) -> dict:
    rollout = server.api_post(
        "rollouts/",
        {
            "configuration": name,
            "candidate_version": candidate["number"],
            "stages": stages,
            "max_failure_rate": max_failure_rate,
            "apply_timeout_seconds": 60,
        },
    )
    server.api_post(f"rollouts/{rollout['id']}/start/", {})
    return rollout


def wait(server: LiveOpampServer, fleet: SignedFleet, predicate: Any, *, what: str, timeout: float = 60) -> Any:
    try:
        return server.wait_for(predicate, timeout=timeout, interval=0.3, what=what)
    except AssertionError as error:
        states = config_states(server, fleet.processes[0].name.rsplit("-", 1)[0])
        raise AssertionError(
            f"{error}\nagent states: {states}\n{server.celery_log()[-3000:]}\n{fleet.output()}"
        ) from None


def test_an_aborted_rollout_returns_every_signing_agent_to_the_stable_version(signed_server):
    server, fleet = signed_server
    name, stable_hash, candidate = prepare(server, fleet, "signed-abort", failing=set())
    rollout = start_rollout(server, name, candidate, max_failure_rate=0.5, stages=ONE_STAGE)
    wait(
        server,
        fleet,
        lambda: every_agent(server, name, state="applied", config_hash=candidate["config_hash"]),
        what="every agent applied the signed candidate",
    )

    server.api_post(f"rollouts/{rollout['id']}/abort/", {})

    wait(
        server,
        fleet,
        lambda: every_agent(server, name, state="applied", config_hash=stable_hash),
        what="every agent back on the stable version, APPLIED",
    )
    assert not fleet.refusals()
    wait(server, fleet, lambda: server.api(f"rollouts/{rollout['id']}/")["state"] == "rolled_back", what="rolled back")


def test_an_automatic_rollback_returns_every_signing_agent_to_the_stable_version(signed_server):
    server, fleet = signed_server
    # One agent of three fails the candidate: 33% is over the 20% budget. It is left out
    # of the first stage, so the others have applied the candidate when it fails.
    name, stable_hash, candidate = prepare(server, fleet, "signed-auto", failing={0})
    stages = [{"percent": 100, "selector": f"host.name notin ({name}-0)"}, *ONE_STAGE]
    rollout = start_rollout(server, name, candidate, max_failure_rate=0.2, stages=stages)
    # From the agents' own logs: the window in which they run the candidate may be shorter
    # than a poll of the API, since beat rolls back within a tick or two.
    applied_candidate = f"remote config {candidate['config_hash'][:16]} applied"
    for process in fleet.processes[1:]:
        process.wait_for_output(applied_candidate, timeout=60)
    fleet.processes[0].wait_for_output(f"remote config {candidate['config_hash'][:16]} failed", timeout=60)

    wait(
        server,
        fleet,
        lambda: server.api(f"rollouts/{rollout['id']}/")["state"] in {"rolling_back", "rolled_back"},
        what="beat rolled the rollout back",
    )
    events = server.api(f"rollouts/{rollout['id']}/events/")
    assert any(event["kind"] == "budget_exceeded" for event in events), events
    wait(
        server,
        fleet,
        lambda: every_agent(server, name, state="applied", config_hash=stable_hash),
        what="every agent back on the stable version, APPLIED",
    )
    assert not fleet.refusals()
    wait(server, fleet, lambda: server.api(f"rollouts/{rollout['id']}/")["state"] == "rolled_back", what="rolled back")
