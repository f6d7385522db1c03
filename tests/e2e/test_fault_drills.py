"""bench/fault_drills.py at test size, so the drill code keeps working: the Celery worker
SIGKILLed in the middle of a rollout's 10% stage, 50 agents, on the drill's own PostgreSQL
cluster and redis-server; every invariant must hold. And the drill's bookkeeping of which
status reports the server acknowledged, on its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from opamp.proto import opamp_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[2]
DRILLS = REPO_ROOT / "bench" / "fault_drills.py"


def load_drills() -> ModuleType:
    """The bench script as a module (it is run as a script: bench/ is no package)."""
    if (loaded := sys.modules.get("fault_drills")) is not None:
        return loaded
    sys.path.insert(0, str(DRILLS.parent))
    try:
        spec = importlib.util.spec_from_file_location("fault_drills", DRILLS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fault_drills"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(DRILLS.parent))


def status_report(config_hash: bytes, status: int) -> pb.AgentToServer:
    message = pb.AgentToServer()
    message.remote_config_status.last_remote_config_hash = config_hash
    message.remote_config_status.status = status
    return message


def test_a_status_report_counts_as_acknowledged_only_once_its_reply_came() -> None:
    ledger = load_drills().Ledger()
    ledger.new_session()
    ledger.on_send(status_report(b"\x01", pb.RemoteConfigStatuses_APPLYING))
    ledger.on_send(pb.AgentToServer())  # a heartbeat
    ledger.on_send(status_report(b"\x01", pb.RemoteConfigStatuses_APPLIED))
    assert (ledger.sent, ledger.acked) == (2, 0)
    ledger.on_reply(pb.ServerToAgent())
    assert (ledger.acked, ledger.last_acked) == (1, ("01", pb.RemoteConfigStatuses_APPLYING))
    ledger.on_reply(pb.ServerToAgent())
    assert ledger.acked == 1
    refusal = pb.ServerToAgent()
    refusal.error_response.type = pb.ServerErrorResponseType_Unavailable
    ledger.on_reply(refusal)
    # Refused before any work: not acknowledged, and the last acknowledged stays APPLYING.
    assert (ledger.acked, ledger.last_acked) == (1, ("01", pb.RemoteConfigStatuses_APPLYING))
    assert ledger.last_sent == ("01", pb.RemoteConfigStatuses_APPLIED)


def test_a_new_session_forgets_what_the_old_one_left_unanswered() -> None:
    ledger = load_drills().Ledger()
    ledger.new_session()
    ledger.on_send(status_report(b"\x02", pb.RemoteConfigStatuses_APPLIED))
    ledger.new_session()
    ledger.on_reply(pb.ServerToAgent())  # answers the new session's first message, not the old one's
    assert (ledger.sent, ledger.acked, ledger.last_acked) == (1, 0, None)


def drill_services_available() -> bool:
    pg_ctl = shutil.which("pg_ctl") or any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return bool(pg_ctl) and shutil.which("redis-server") is not None


@pytest.mark.live_server
def test_celery_worker_sigkill_drill_at_test_size(tmp_path: Path) -> None:
    if not drill_services_available():
        if os.environ.get("OPAMP_REQUIRE_ALL_TEST_SERVICES") == "1":
            pytest.fail("the fault drill needs PostgreSQL's server binaries (pg_ctl, initdb) and redis-server")
        pytest.skip("PostgreSQL's server binaries or redis-server are not installed")
    output = tmp_path / "drill.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DJANGO_")}
    args = ["--drill", "celery", "--agents", "50", "--connect-rate", "100", "--hold", "3", "--heartbeat", "5"]
    completed = subprocess.run(
        [sys.executable, str(DRILLS), *args, "--settle-timeout", "90", "--output", str(output)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert output.exists(), completed.stderr[-3000:]
    (result,) = json.loads(output.read_text())
    failed = {name: verdict for name, verdict in result.get("invariants", {}).items() if not verdict["ok"]}
    assert completed.returncode == 0, (result.get("error"), failed, completed.stdout[-3000:])
    assert result["final_state"] == "succeeded"
    assert set(result["invariants"]) == {
        "every_agent_reconnected",
        "desired_is_the_resolvers_answer",
        "agents_report_their_desired_hash",
        "server_stores_the_desired_hash_reported",
        "rollout_ended_as_expected",
        "no_transition_twice",
        "no_status_report_lost",
        "operator_writes_kept",
    }
    # The worker was killed while the rollout ran, and a new one finished it.
    kinds = [mark["what"] for mark in result["timeline"]]
    fault = next(i for i, what in enumerate(kinds) if what.startswith("fault: SIGKILL celery-worker"))
    assert any(what.startswith("rollout event succeeded") for what in kinds[fault:])
    assert result["at_end"]["status_reports_acknowledged"] > result["at_fault"]["status_reports_acknowledged"]
    assert result["operator"]["before_fault"]["probes"] > 0
    assert result["operator_publishes"]["before_fault"]["probes"] > 0
