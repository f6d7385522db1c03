"""The production profile's front: nginx (the rendered template) in front of the server.

nginx buffers request bodies by default; then a POST without a credential is refused only
after nginx has taken in, and spooled, all of it. For /v1/opamp the body streams through,
so the server's refusal from the headers reaches the sender before it has sent the body.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.deploy.nginx import Nginx
from tests.deploy.pki import front_files
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server]

MIB = 1024 * 1024


def test_a_post_without_a_credential_is_refused_from_its_headers_through_nginx(
    tmp_path: Path, nginx_binary: str
) -> None:
    files = front_files(tmp_path, "Bounds")
    server = LiveOpampServer(tmp_path / "server", extra_env={"OPAMP_AGENT_AUTH": "required", **files.server_env()})
    server.manage("write_crl")
    nginx: Nginx | None = None
    try:
        server.start()
        nginx = Nginx.in_front(nginx_binary, tmp_path / "nginx", files, upstream=f"127.0.0.1:{server.port}")
        nginx.start()
        context = ssl.create_default_context(cafile=str(files.server_ca))
        with (
            socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(
                b"POST /v1/opamp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n"
                b"Content-Length: %d\r\n\r\n" % (32 * MIB)
            )
            sock.sendall(b"\x00" * 4096)  # nginx connects upstream once body bytes arrive
            started = time.monotonic()
            sock.settimeout(5)
            answer = sock.recv(4096)
            waited = time.monotonic() - started
        assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 401 Unauthorized", answer[:300]
        assert waited < 3
    finally:
        if nginx is not None:
            nginx.stop()
        server.close()
