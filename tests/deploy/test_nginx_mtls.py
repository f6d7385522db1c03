"""Real nginx with the rendered configuration, in front of an echoing upstream.

What the application relies on: nginx refuses a client certificate that does not verify
(other CA, expired, revoked) before the request reaches daphne, and the headers daphne
receives are nginx's, whatever the client sent.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from django.core.management import call_command
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as websocket_connect

from signing.ca import LoadedCa
from tests.deploy import pki
from tests.deploy.nginx import Nginx
from tests.deploy.upstream import EchoServer, header_values

MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Pki:
    directory: Path
    agent_ca: LoadedCa
    agent_ca_file: Path
    server_ca_file: Path
    server_cert: Path
    server_key: Path
    crl: Path
    good: pki.ClientCert
    revoked: pki.ClientCert
    revoked_later: pki.ClientCert
    other_ca: pki.ClientCert
    expired: pki.ClientCert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    agent_ca = pki.new_ca("Test agent CA")
    server_ca = pki.new_ca("Test server CA")
    server_cert, server_key = pki.issue_server(server_ca, directory)
    stranger_ca = pki.new_ca("Test agent CA")  # the same name, another key
    revoked = pki.issue_client(agent_ca, directory, "revoked")
    return Pki(
        directory=directory,
        agent_ca=agent_ca,
        agent_ca_file=pki.write_ca_cert(agent_ca, directory / "agent-ca.pem"),
        server_ca_file=pki.write_ca_cert(server_ca, directory / "server-ca.pem"),
        server_cert=server_cert,
        server_key=server_key,
        crl=pki.write_crl(agent_ca, directory / "agents.crl", [revoked]),
        good=pki.issue_client(agent_ca, directory, "good"),
        revoked=revoked,
        revoked_later=pki.issue_client(agent_ca, directory, "revoked-later"),
        other_ca=pki.issue_client(stranger_ca, directory, "other-ca"),
        expired=pki.issue_client(agent_ca, directory, "expired", now=datetime.now(UTC) - timedelta(days=3), days=1),
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoServer]:
    server = EchoServer().start()
    yield server
    server.stop()


def _start_nginx(binary: str, workdir: Path, upstream: EchoServer, certificates: Pki, crl: Path) -> Nginx:
    nginx = Nginx(
        binary,
        workdir,
        upstream=upstream.address,
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        ca_cert=certificates.agent_ca_file,
        crl=crl,
        max_body_bytes=MAX_BODY_BYTES,
    )
    nginx.check()
    nginx.start()
    return nginx


@pytest.fixture(scope="module")
def nginx(
    nginx_binary: str, tmp_path_factory: pytest.TempPathFactory, upstream: EchoServer, certificates: Pki
) -> Iterator[Nginx]:
    server = _start_nginx(nginx_binary, tmp_path_factory.mktemp("nginx"), upstream, certificates, certificates.crl)
    yield server
    server.stop()


def tls_context(certificates: Pki, client: pki.ClientCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates.server_ca_file))
    if client is not None:
        context.load_cert_chain(str(client.cert_file), str(client.key_file))
    return context


def request(
    nginx: Nginx,
    certificates: Pki,
    client: pki.ClientCert | None = None,
    *,
    method: str = "GET",
    path: str = "/api/v1/agents/",
    **kwargs: Any,
) -> httpx.Response:
    """One request on a connection of its own (a new TLS handshake every time)."""
    with httpx.Client(verify=tls_context(certificates, client), timeout=10) as http:
        return http.request(method, f"{nginx.base_url}{path}", **kwargs)


def echoed(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    seen: dict[str, Any] = response.json()
    return seen


def single(seen: dict[str, Any], name: str) -> str:
    values = header_values(seen, name)
    assert len(values) == 1, f"{name}: {values!r}"
    return values[0]


def unique_path() -> str:
    return f"/api/v1/marker-{uuid.uuid4().hex}/"


# --- (a) no client certificate ----------------------------------------------------------


def test_without_a_certificate_the_request_is_proxied_as_verify_none(nginx: Nginx, certificates: Pki) -> None:
    seen = echoed(request(nginx, certificates))
    assert single(seen, "X-Client-Verify") == "NONE"
    # An empty value: nginx leaves the header out, the application reads it as empty.
    assert header_values(seen, "X-Client-Cert") in ([], [""])
    assert single(seen, "X-Forwarded-For") == "127.0.0.1"
    assert single(seen, "X-Forwarded-Proto") == "https"
    assert single(seen, "Host") == f"127.0.0.1:{nginx.port}"


# --- (b) a valid client certificate -----------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/agents/", "/admin/login/", "/static/admin/css/base.css", "/"])
def test_a_valid_certificate_reaches_every_path_as_success(nginx: Nginx, certificates: Pki, path: str) -> None:
    seen = echoed(request(nginx, certificates, certificates.good, path=path))
    assert seen["path"] == path
    assert single(seen, "X-Client-Verify") == "SUCCESS"
    forwarded = single(seen, "X-Client-Cert")
    assert "\n" not in forwarded and " " not in forwarded  # URL-escaped: one header line
    assert unquote(forwarded) == certificates.good.pem


def test_opamp_plain_http_post_carries_the_body_and_the_certificate(nginx: Nginx, certificates: Pki) -> None:
    body = bytes(range(256)) * 40
    response = request(
        nginx,
        certificates,
        certificates.good,
        method="POST",
        path="/v1/opamp",
        content=body,
        headers={"Content-Type": "application/x-protobuf"},
    )
    seen = echoed(response)
    assert (seen["method"], seen["path"], seen["body_bytes"]) == ("POST", "/v1/opamp", len(body))
    assert single(seen, "Content-Type") == "application/x-protobuf"
    assert single(seen, "X-Client-Verify") == "SUCCESS"
    assert unquote(single(seen, "X-Client-Cert")) == certificates.good.pem


def test_bodies_up_to_the_limit_pass_and_larger_ones_are_refused_by_nginx(
    nginx: Nginx, certificates: Pki, upstream: EchoServer
) -> None:
    at_limit = request(nginx, certificates, method="POST", path="/v1/opamp", content=b"x" * MAX_BODY_BYTES)
    assert echoed(at_limit)["body_bytes"] == MAX_BODY_BYTES
    path = unique_path()
    too_large = request(nginx, certificates, method="POST", path=path, content=b"x" * (MAX_BODY_BYTES + 1))
    assert too_large.status_code == 413
    assert path not in upstream.received_paths()


# --- (c) what the client sends is overwritten -------------------------------------------

SPOOFED = {
    "X-Client-Cert": "-----BEGIN%20CERTIFICATE-----%0Aforged%0A-----END%20CERTIFICATE-----%0A",
    "X-Client-Verify": "SUCCESS",
    "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Proto": "http",
    "X-Forwarded-Host": "evil.example",
    "Forwarded": "for=203.0.113.9;proto=https",
}


def test_headers_sent_by_a_client_without_a_certificate_are_overwritten(nginx: Nginx, certificates: Pki) -> None:
    seen = echoed(request(nginx, certificates, headers=SPOOFED))
    assert single(seen, "X-Client-Verify") == "NONE"
    assert header_values(seen, "X-Client-Cert") in ([], [""])
    assert single(seen, "X-Forwarded-For") == "127.0.0.1"
    assert single(seen, "X-Forwarded-Proto") == "https"
    assert header_values(seen, "X-Forwarded-Host") == []
    assert header_values(seen, "Forwarded") == []


def test_headers_sent_with_a_valid_certificate_are_overwritten(nginx: Nginx, certificates: Pki) -> None:
    seen = echoed(request(nginx, certificates, certificates.good, path="/v1/opamp", method="POST", headers=SPOOFED))
    assert single(seen, "X-Client-Verify") == "SUCCESS"
    assert unquote(single(seen, "X-Client-Cert")) == certificates.good.pem
    assert single(seen, "X-Forwarded-For") == "127.0.0.1"
    assert single(seen, "X-Forwarded-Proto") == "https"


def test_underscore_spellings_of_the_headers_never_reach_the_upstream(nginx: Nginx, certificates: Pki) -> None:
    # daphne would present X_Client_Cert to Django as HTTP_X_CLIENT_CERT, like X-Client-Cert.
    headers = {"X_Client_Cert": SPOOFED["X-Client-Cert"], "X_Client_Verify": "SUCCESS"}
    seen = echoed(request(nginx, certificates, headers=headers))
    names = [name.lower().replace("_", "-") for name, _ in seen["headers"]]
    assert names.count("x-client-verify") == 1
    assert single(seen, "X-Client-Verify") == "NONE"
    assert "x-client-cert" not in names


def test_an_upgrade_header_is_passed_only_on_the_opamp_path(nginx: Nginx, certificates: Pki) -> None:
    seen = echoed(request(nginx, certificates, headers={"Upgrade": "websocket", "Connection": "Upgrade"}))
    assert header_values(seen, "Upgrade") == []


# --- (d) and (e): certificates that do not verify never reach the upstream ----------------


@pytest.mark.parametrize("which", ["other_ca", "expired", "revoked"])
def test_a_certificate_that_does_not_verify_is_refused_before_the_upstream(
    nginx: Nginx, certificates: Pki, upstream: EchoServer, which: str
) -> None:
    client: pki.ClientCert = getattr(certificates, which)
    for method, path in (("GET", unique_path()), ("POST", f"/v1/opamp?{uuid.uuid4().hex}")):
        response = request(
            nginx, certificates, client, method=method, path=path, content=b"\x00" if method == "POST" else None
        )
        # 403, as the application refuses credentials, so agents fall back to their token.
        assert response.status_code == 403, response.text
        assert response.text.startswith("client certificate refused: FAILED:")
        assert path not in upstream.received_paths()


def test_a_revoked_certificate_is_refused_after_the_crl_is_rewritten_and_nginx_reloaded(
    nginx_binary: str, tmp_path: Path, upstream: EchoServer, certificates: Pki
) -> None:
    crl = shutil.copy(certificates.crl, tmp_path / "agents.crl")
    server = _start_nginx(nginx_binary, tmp_path / "nginx", upstream, certificates, Path(crl))
    try:
        assert single(echoed(request(server, certificates, certificates.revoked_later)), "X-Client-Verify") == "SUCCESS"
        pki.write_crl(certificates.agent_ca, Path(crl), [certificates.revoked, certificates.revoked_later])
        # Until the reload nginx keeps the CRL it loaded.
        assert request(server, certificates, certificates.revoked_later).status_code == 200
        server.reload()
        path = unique_path()
        assert request(server, certificates, certificates.revoked_later, path=path).status_code == 403
        assert path not in upstream.received_paths()
        # Everyone else carries on; the earlier revocation still holds.
        assert single(echoed(request(server, certificates, certificates.good)), "X-Client-Verify") == "SUCCESS"
        assert request(server, certificates, certificates.revoked).status_code == 403
    finally:
        server.stop()


# --- (f) WebSocket ----------------------------------------------------------------------


@pytest.mark.parametrize("with_certificate", [True, False])
def test_a_websocket_upgrade_passes_through_with_the_headers(
    nginx: Nginx, certificates: Pki, with_certificate: bool
) -> None:
    client = certificates.good if with_certificate else None
    url = f"wss://127.0.0.1:{nginx.port}/v1/opamp"
    spoofed = {"X-Client-Verify": "SUCCESS", "X-Forwarded-For": "203.0.113.9"}
    with websocket_connect(url, ssl=tls_context(certificates, client), additional_headers=spoofed) as websocket:
        seen = json.loads(websocket.recv(timeout=10))
        assert seen["path"] == "/v1/opamp"
        assert single(seen, "Upgrade").lower() == "websocket"
        assert single(seen, "X-Forwarded-For") == "127.0.0.1"
        if with_certificate:
            assert single(seen, "X-Client-Verify") == "SUCCESS"
            assert unquote(single(seen, "X-Client-Cert")) == certificates.good.pem
        else:
            assert single(seen, "X-Client-Verify") == "NONE"
            assert header_values(seen, "X-Client-Cert") in ([], [""])
        frame = bytes(range(256)) * 400  # over 64 KiB: the 64-bit length form
        websocket.send(frame)
        assert websocket.recv(timeout=10) == frame
        websocket.send("text")
        assert websocket.recv(timeout=10) == "text"


def test_a_websocket_with_a_revoked_certificate_is_refused(nginx: Nginx, certificates: Pki) -> None:
    url = f"wss://127.0.0.1:{nginx.port}/v1/opamp"
    with pytest.raises(InvalidStatus) as refused:
        websocket_connect(url, ssl=tls_context(certificates, certificates.revoked), open_timeout=10)
    assert refused.value.response.status_code == 403


# --- no TLS session resumption ----------------------------------------------------------


def _tls_exchange(nginx: Nginx, context: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
    """One request over a raw TLS socket; the session afterwards and whether it was resumed."""
    with (
        socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(b"GET /api/v1/agents/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert tls.session is not None
        return tls.session, bool(tls.session_reused)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_tls_sessions_are_never_resumed(nginx: Nginx, certificates: Pki, version: ssl.TLSVersion) -> None:
    # A resumed session would carry a certificate check made before the CRL was refreshed.
    context = tls_context(certificates, certificates.good)
    context.minimum_version = context.maximum_version = version
    session, _ = _tls_exchange(nginx, context, None)
    _, reused = _tls_exchange(nginx, context, session)
    assert not reused


# --- the server block on its own, as installed into /etc/nginx/conf.d/ -------------------


def test_the_server_block_is_a_valid_http_context_include(nginx_binary: str, tmp_path: Path, certificates: Pki) -> None:
    static = tmp_path / "static"
    static.mkdir()
    site = tmp_path / "opamp.conf"
    call_command(
        "render_nginx_config",
        "--listen", "127.0.0.1:8443", "--listen", "[::1]:8443",
        "--server-name", "opamp.example.com",
        "--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key),
        "--ca-cert", str(certificates.agent_ca_file), "--crl", str(certificates.crl),
        "--static-root", str(static),
        "--output", str(site),
        stderr=io.StringIO(),
    )  # fmt: skip
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {tmp_path}/body;\n    include {site};\n}}\n"
    )
    result = subprocess.run([nginx_binary, "-t", "-c", str(main)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
