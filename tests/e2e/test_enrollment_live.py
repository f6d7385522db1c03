"""Enrollment as the README documents it, against a live server (daphne, required agent auth,
a configured CA), with the real `agent_client` command line over ws://.

- `enroll` with a manual-approval token exits 3 (pending); an operator approves through the
  API; `enroll` run again receives the certificate and exits 0.
- `run --token` with an auto-approving token gets its certificate, installs it, reconnects
  and keeps working with its token (a ws:// or http:// connection cannot present the
  certificate).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent_client.state import INSTANCE_UID_FILE
from signing.ca import create_ca, write_ca
from tests.support.live_server import REPO_ROOT, LiveOpampServer

pytestmark = [pytest.mark.live_server]

EXIT_OK = 0
EXIT_PENDING = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One server for the module: each test enrols its own agents with its own token."""
    tmp_path = tmp_path_factory.mktemp("enrollment")
    ca = create_ca(common_name="live agent CA", days=30)
    write_ca(ca, key_file=tmp_path / "ca.key", cert_file=tmp_path / "ca.pem")
    live = LiveOpampServer(
        tmp_path / "server",
        extra_env={
            "OPAMP_AGENT_AUTH": "required",
            "OPAMP_CA_KEY_FILE": str(tmp_path / "ca.key"),
            "OPAMP_CA_CERT_FILE": str(tmp_path / "ca.pem"),
            "OPAMP_HEARTBEAT_INTERVAL_SECONDS": "1",
        },
    )
    live.start()
    try:
        yield live
    finally:
        live.close()


def new_token(server: LiveOpampServer, *, auto_approve: bool) -> str:
    created = server.api_post(
        "enrollment-tokens/",
        {"name": "live", "expires_in_seconds": 3600, "max_uses": 1, "auto_approve": auto_approve},
    )
    return str(created["secret"])


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent_client", *args]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_command(*args), cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout
    )


def installed_uid(state_dir: Path) -> str:
    cert = x509.load_pem_x509_certificate((state_dir / "client.crt").read_bytes())
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_enroll_pending_then_approved_then_enroll_again_delivers_the_certificate(server, tmp_path):
    token = new_token(server, auto_approve=False)
    state_dir = tmp_path / "agent"
    common = ("--server", server.ws_url, "--state-dir", str(state_dir), "--token", token, "--heartbeat", "1")

    first = run_cli("enroll", *common, "--timeout", "4")
    assert first.returncode == EXIT_PENDING, first.stderr
    uid = (state_dir / INSTANCE_UID_FILE).read_text().strip()
    pending = server.api("certificate-requests/", state="pending", instance_uid=uid)["results"]
    assert [request["instance_uid"] for request in pending] == [uid]

    server.api_post(f"certificate-requests/{pending[0]['id']}/approve/", None)

    second = run_cli("enroll", *common, "--timeout", "15")
    assert second.returncode == EXIT_OK, f"{second.stdout}\n{second.stderr}\n--- server ---\n{server.log()[-3000:]}"
    assert installed_uid(state_dir) == uid
    assert not (state_dir / "pending.key").exists()
    # The certificate the agent stored is the one the operator approved.
    issued = server.api("certificates/", instance_uid=uid)["results"]
    assert len(issued) == 1
    stored = x509.load_pem_x509_certificate((state_dir / "client.crt").read_bytes())
    assert format(stored.serial_number, "x") == issued[0]["serial"].lstrip("0")


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_run_with_an_auto_approving_token_without_tls_gets_a_certificate_and_keeps_working(server, tmp_path, transport):
    token = new_token(server, auto_approve=True)
    url = server.ws_url if transport == "ws" else server.http_url
    state_dir = tmp_path / "agent"
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            agent_command(
                "run",
                "--server",
                url,
                "--transport",
                transport,
                "--state-dir",
                str(state_dir),
                "--token",
                token,
                "--heartbeat",
                "1",
                "--attr",
                "service.name=live-enroll",
            ),
            cwd=REPO_ROOT,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        server.wait_for(lambda: (state_dir / "client.crt").exists(), timeout=20, what="the certificate installed")
        uid = installed_uid(state_dir)
        installed_at = time.time()

        def heartbeating_after_install() -> Any:
            agent_row = next((row for row in server.agents() if row["instance_uid"] == uid), None)
            settled = time.time() - installed_at > 3  # past the reconnect that follows the install
            return agent_row if settled and agent_row is not None and agent_row["connected"] else None

        seen = server.wait_for(heartbeating_after_install, timeout=20, what="the agent connected after its install")
        # Still answered on its token after the install: a later heartbeat is recorded.
        server.wait_for(
            lambda: server.api(f"agents/{uid}/")["last_seen"] != seen["last_seen"], timeout=10, what="a later heartbeat"
        )
        assert agent.poll() is None
        output = log_path.read_text(errors="replace")
        assert "holds a client certificate" not in output
        assert "refused" not in output, output[-3000:]
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
