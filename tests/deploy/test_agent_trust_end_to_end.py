"""The trust chain end to end, with real processes: nginx terminating TLS (mTLS), daphne, and
agent_client.

An agent enrolls over TLS with a token, sends a CSR, gets a certificate, reconnects through
nginx with it, receives a signed configuration, verifies and applies it; its certificate is
revoked, its live session is dropped, and its next connections are refused: by the app at
once, and by nginx itself once nginx has reloaded the CRL the app rewrote; the agent, given
its token again, enrolls anew and connects with its new certificate.
"""

from __future__ import annotations

import os
import ssl
import stat
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from opamp.identifiers import uuid7
from signing.agent_credentials import CERTIFICATE_NOT_CURRENT, CREDENTIAL_REQUIRED
from signing.config_signing import generate_signing_key
from tests.deploy.nginx import Nginx
from tests.deploy.pki import front_files
from tests.fleet.messages import full_report
from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess

pytestmark = [pytest.mark.live_server]

FILES = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


def https_client(server_ca: Path, *, cert: tuple[Path, Path] | None = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(server_ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.Client(verify=context, timeout=10)


def post_report(client: httpx.Client, url: str, uid: uuid.UUID) -> httpx.Response:
    return client.post(
        url,
        content=full_report(uid.bytes, 1).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent_client", *args]


def test_enroll_over_tls_then_mtls_signed_config_and_revocation(tmp_path: Path, nginx_binary: str) -> None:
    # The agents' CA (the project's), a separate CA for nginx's server certificate, a
    # config-signing key and the CRL file the app keeps current.
    files = front_files(tmp_path, "End-to-end")
    server_ca = files.server_ca
    signing_pair = generate_signing_key(tmp_path / "signing-key.pem")
    (tmp_path / "trusted.pem").write_text(signing_pair.public_key_pem)

    server = LiveOpampServer(
        tmp_path / "server",
        extra_env={
            "OPAMP_AGENT_AUTH": "required",
            **files.server_env(),
            "OPAMP_SIGNING_KEY_FILE": str(tmp_path / "signing-key.pem"),
        },
    )
    server.manage("write_crl")  # nginx will not start without its CRL
    nginx: Nginx | None = None
    agent: AgentProcess | None = None
    state = tmp_path / "agent"
    try:
        server.start()
        nginx = Nginx.in_front(nginx_binary, tmp_path / "nginx", files, upstream=f"127.0.0.1:{server.port}")
        nginx.start()
        wss_url = f"wss://127.0.0.1:{nginx.port}/v1/opamp"
        https_url = f"{nginx.base_url}/v1/opamp"

        # Without a credential, the production setting refuses the agent, through nginx too.
        with https_client(server_ca) as anonymous:
            refused = post_report(anonymous, https_url, uuid7())
        assert refused.status_code == 401 and refused.text.strip() == CREDENTIAL_REQUIRED

        # 1. Enroll over TLS with a token (auto-approving, with a label).
        token = server.api_post(
            "enrollment-tokens/",
            {"name": "e2e", "expires_in_seconds": 3600, "max_uses": 1, "auto_approve": True, "labels": {"site": "lab"}},
        )
        enrolled = AgentProcess(
            agent_command(
                "enroll", "--server", wss_url, "--token", token["secret"], "--state-dir", str(state),
                "--ca-file", str(server_ca), "--timeout", "30",
            ),
            tmp_path / "logs",
            name="enroll",
            env=dict(os.environ),
        )  # fmt: skip
        assert enrolled.process.wait(timeout=60) == 0, enrolled.output()
        for name in ("client.key", "client.crt"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
        uid = uuid.UUID((state / "instance_uid").read_text().strip())
        certificates = server.api("certificates/", instance_uid=str(uid))["results"]
        assert len(certificates) == 1 and not certificates[0]["revoked_at"]

        # 2. Run with the certificate only (no token): mTLS through nginx.
        agent = AgentProcess(
            agent_command(
                "run", "--server", wss_url, "--state-dir", str(state), "--ca-file", str(server_ca),
                "--trusted-key", str(tmp_path / "trusted.pem"), "--attr", "service.name=e2e-agent",
                "--heartbeat", "1",
            ),
            tmp_path / "logs",
            name="agent",
            env=dict(os.environ),
        )  # fmt: skip
        registered = server.wait_for(
            lambda: [a for a in server.agents(attribute="service.name=e2e-agent") if a["connected"]],
            what="the agent connected with its certificate",
        )
        assert registered[0]["instance_uid"] == str(uid)
        assert server.api(f"agents/{uid}/labels/")["operator_labels"] == {"site": "lab"}  # from the token

        # 3. A signed configuration: verified by the agent against the trusted key, applied.
        server.api_post("configurations/", {"name": "e2e", "selector": "service.name=e2e-agent"})
        version = server.api_post("configurations/e2e/versions/", {"files": FILES})
        config_state = server.wait_for(
            lambda: (s := server.api(f"agents/{uid}/config/"))["state"] == "applied" and s,
            what="the signed configuration applied",
        )
        assert config_state["reported_hash"] == version["config_hash"]
        assert (state / "config" / "collector.yaml").read_text() == FILES["collector.yaml"]["body"]

        # 4. Revoke: the live session is dropped and the agent is refused on reconnecting.
        server.api_post(f"certificates/{certificates[0]['id']}/revoke/", {"reason": "key_compromise"})
        server.wait_for(
            lambda: not server.agents(attribute="service.name=e2e-agent")[0]["connected"],
            what="the revoked agent's session dropped",
        )
        agent.wait_for_output("server refused the credential", timeout=30)

        certificate_pair = (state / "client.crt", state / "client.key")
        with https_client(server_ca, cert=certificate_pair) as revoked:
            # nginx still holds the CRL it loaded; the app refuses the certificate itself.
            by_app = post_report(revoked, https_url, uid)
            assert by_app.status_code == 401 and by_app.text.strip() == CERTIFICATE_NOT_CURRENT
        # The app rewrote the CRL file on revocation; once nginx reloads it, nginx refuses
        # the TLS client certificate before anything reaches the app.
        agent.stop()
        nginx.reload()
        with https_client(server_ca, cert=certificate_pair) as revoked:
            by_nginx = post_report(revoked, https_url, uid)
        assert by_nginx.status_code == 403
        assert by_nginx.text.strip() == "client certificate refused: FAILED:certificate revoked"

        # 5. An agent that still holds its enrollment token sets the refused certificate
        # aside and comes back with the token; its CSR waits for an operator (an agent
        # whose certificate was revoked is never approved automatically), who approves it;
        # the agent installs the new certificate and connects with it.
        agent = AgentProcess(
            agent_command(
                "run", "--server", wss_url, "--state-dir", str(state), "--ca-file", str(server_ca),
                "--trusted-key", str(tmp_path / "trusted.pem"), "--attr", "service.name=e2e-agent",
                "--heartbeat", "1", "--token", token["secret"],
            ),
            tmp_path / "logs",
            name="agent-reenrolled",
            env=dict(os.environ),
        )  # fmt: skip
        agent.wait_for_output("presenting the enrollment token next", timeout=30)
        pending = server.wait_for(
            lambda: [r for r in server.api("certificate-requests/", state="pending")["results"]
                     if r["instance_uid"] == str(uid)],
            what="the agent's certificate request waiting for an operator",
        )  # fmt: skip
        server.api_post(f"certificate-requests/{pending[0]['id']}/approve/", {})
        renewed = server.wait_for(
            lambda: [c for c in server.api("certificates/", instance_uid=str(uid))["results"] if not c["revoked_at"]],
            what="a new certificate for the agent",
        )
        agent.wait_for_output("certificate installed", timeout=30)
        server.wait_for(
            lambda: server.agents(attribute="service.name=e2e-agent")[0]["connected"],
            what="the agent connected again",
        )
        assert renewed[0]["id"] != certificates[0]["id"]
        with https_client(server_ca, cert=certificate_pair) as renewed_client:
            assert post_report(renewed_client, https_url, uid).status_code == 200
    finally:
        if agent is not None:
            agent.stop()
        if nginx is not None:
            nginx.stop()
        server.close()
