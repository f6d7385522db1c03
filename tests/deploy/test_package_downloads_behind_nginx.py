"""Package downloads in the production profile: the server checks the URL's token and hands
the bytes to nginx (X-Accel-Redirect to an `internal` location aliasing the packages
directory); nginx sends them with Range, HEAD and the server's ETag.

One server process with OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX set, real nginx rendered by
`manage.py render_nginx_config` in front of it. A package is uploaded through nginx (past
its general body limit: the upload route has the package limit), an agent connects through
nginx, is offered the file and installs it; then the offered URL is fetched as an agent
would (whole, cut and resumed, HEAD), and every other way in is refused with 404 and no
bytes: an expired, forged or another agent's token, and the internal prefix itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core import signing

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.packages import PackageSettings
from agent_client.state import MemoryState
from agent_client.transport import transport_for_url
from opamp.config_signature import key_id_for, load_public_key_pem
from opamp.proto import opamp_pb2 as pb
from rollouts.package_downloads import SALT, download_token
from signing.config_signing import generate_signing_key
from tests.deploy.nginx import Nginx
from tests.deploy.pki import front_files, write_crl
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server]

PREFIX = "/_internal/package-files/"
PACKAGE = "collector"
# Past nginx's general body limit below, and several nginx output buffers long.
DATA = os.urandom(3 * 1024 * 1024 + 17)
GENERAL_BODY_LIMIT = 1024 * 1024


class OfferedUrls(AgentObserver):
    def __init__(self) -> None:
        self.urls: list[str] = []

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        if reply.HasField("packages_available") and PACKAGE in reply.packages_available.packages:
            self.urls.append(reply.packages_available.packages[PACKAGE].file.download_url)


@dataclass(frozen=True)
class Front:
    server: LiveOpampServer
    nginx: Nginx
    server_ca: Path
    package_dir: Path
    file_id: int
    url: str  # the URL the agent was offered, on nginx
    agent_uid: uuid.UUID
    other_uid: uuid.UUID  # an agent the package is not assigned to

    def client(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.server_ca)), timeout=15)

    def url_for(self, token: str) -> str:
        return f"{self.nginx.base_url}/v1/package-files/{token}"


def upload_through_nginx(nginx: Nginx, server: LiveOpampServer, server_ca: Path) -> int:
    server.api_post("packages/", {"name": PACKAGE, "type": "top_level"})
    server.api_post(f"packages/{PACKAGE}/versions/", {"version": "1.0.0"})
    headers = {"Authorization": f"Token {server.token}", "Content-Type": "application/octet-stream"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(server_ca)), timeout=30) as client:
        # Any other route keeps the general limit.
        refused = client.post(f"{nginx.base_url}/api/v1/packages/", content=DATA, headers=headers)
        assert refused.status_code == 413, refused.text[:300]
        response = client.post(
            f"{nginx.base_url}/api/v1/packages/{PACKAGE}/versions/1.0.0/files/", content=DATA, headers=headers
        )
    assert response.status_code == 201, response.text[:300]
    assert response.json()["sha256"] == hashlib.sha256(DATA).hexdigest()
    return int(response.json()["id"])


async def install_through_nginx(front_url: str, server: LiveOpampServer, server_ca: Path, key: Path, root: Path) -> str:
    """Two agents through nginx; the selected one downloads (through nginx), checks and
    installs the file. The URL it was offered."""
    public_key = load_public_key_pem(key.read_bytes())
    observer = OfferedUrls()
    agents = []
    for tier in ("web", "db"):
        agent_settings = AgentSettings(
            identifying_attributes={"service.name": "downloads", "service.instance.id": tier},
            non_identifying_attributes={"tier": tier},
            heartbeat_interval=0.5,
            trusted_keys={key_id_for(public_key): public_key},
            packages=PackageSettings(directory=root / tier, ca_file=server_ca),
            backoff_initial=0.2,
            backoff_max=1.0,
        )
        transport = transport_for_url(front_url, kind="ws", trust_env=False, ping_interval=None, ca_file=server_ca)
        agents.append(Agent(transport=transport, state=MemoryState(), settings=agent_settings, observer=observer))
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        await asyncio.to_thread(
            server.wait_for, lambda: len(server.agents(attribute="service.name=downloads")) == 2, what="two agents"
        )
        await asyncio.to_thread(
            server.api_post,
            "package-assignments/",
            {"name": "web", "package": PACKAGE, "version": "1.0.0", "selector": "tier=web"},
        )
        deadline = time.monotonic() + 60
        while PACKAGE not in agents[0].packages.installed:
            assert time.monotonic() < deadline, f"not installed; offered {observer.urls}\n{server.log()[-3000:]}"
            await asyncio.sleep(0.2)
        assert agents[1].packages.installed == {}
        return observer.urls[-1]
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, nginx_binary: str) -> Iterator[Front]:
    tmp_path = tmp_path_factory.mktemp("downloads")
    files = front_files(tmp_path, "Downloads")
    package_dir = tmp_path / "packages"
    package_dir.mkdir()
    pair = generate_signing_key(tmp_path / "signing-key.pem")
    (tmp_path / "trusted.pem").write_text(pair.public_key_pem)
    server = LiveOpampServer(
        tmp_path / "server",
        extra_env={
            **files.server_env(),
            # The test signs tokens of its own (expired, another agent's) with the server's secret.
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,
            "OPAMP_SIGNING_KEY_FILE": str(tmp_path / "signing-key.pem"),
            "OPAMP_PACKAGE_DIR": str(package_dir),
            "OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX": PREFIX,
        },
    )
    server.manage("write_crl")
    nginx = Nginx.in_front(
        nginx_binary,
        tmp_path / "nginx",
        files,
        upstream=f"127.0.0.1:{server.port}",
        max_body_bytes=GENERAL_BODY_LIMIT,
        package_files=(PREFIX, package_dir),
    )
    try:
        server.start()
        nginx.start()
        server_ca = files.server_ca
        file_id = upload_through_nginx(nginx, server, server_ca)
        front_url = f"wss://127.0.0.1:{nginx.port}/v1/opamp"
        url = asyncio.run(install_through_nginx(front_url, server, server_ca, tmp_path / "trusted.pem", tmp_path / "a"))
        uids = {
            row["identifying_attributes"]["service.instance.id"]: uuid.UUID(row["instance_uid"])
            for row in server.agents(attribute="service.name=downloads")
        }
        yield Front(server, nginx, server_ca, package_dir, file_id, url, uids["web"], uids["db"])
    finally:
        nginx.stop()
        server.close()


def stored_name(front: Front) -> str:
    (path,) = [path for path in front.package_dir.rglob("*") if path.is_file()]
    return str(path.relative_to(front.package_dir))


def test_the_offered_url_is_on_nginx_and_gives_the_exact_bytes(front: Front) -> None:
    assert front.url.startswith(f"{front.nginx.base_url}/v1/package-files/")
    with front.client() as client:
        response = client.get(front.url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert response.content == DATA
    assert response.headers["Content-Length"] == str(len(DATA))
    # The server's headers, kept or set by nginx: the ETag an agent's If-Range repeats.
    assert response.headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Cache-Control"] == "private, no-store"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "X-Accel-Redirect" not in response.headers


def test_the_server_hands_the_bytes_to_nginx(front: Front) -> None:
    """Asked directly (not through nginx), the server answers with the hand-over and no bytes."""
    token = front.url.rsplit("/", 1)[1]
    response = httpx.get(f"http://127.0.0.1:{front.server.port}/v1/package-files/{token}", timeout=10)
    assert response.status_code == 200
    assert response.headers["X-Accel-Redirect"] == PREFIX + stored_name(front)
    assert response.content == b""


def test_a_cut_download_resumes_with_range_to_the_exact_bytes(front: Front) -> None:
    received = b""
    with front.client() as client:
        with client.stream("GET", front.url) as response:
            assert response.status_code == 200
            etag = response.headers["ETag"]
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) >= len(DATA) // 2:
                    break  # the connection drops half-way
        resumed = client.get(front.url, headers={"Range": f"bytes={len(received)}-", "If-Range": etag})
        assert resumed.status_code == 206
        assert resumed.headers["Content-Range"] == f"bytes {len(received)}-{len(DATA) - 1}/{len(DATA)}"
        assert received + resumed.content == DATA
        middle = client.get(front.url, headers={"Range": "bytes=1000-1999"})
        assert (middle.status_code, middle.content) == (206, DATA[1000:2000])
        tail = client.get(front.url, headers={"Range": "bytes=-17"})
        assert (tail.status_code, tail.content) == (206, DATA[-17:])
        # A partial copy of other bytes: the whole file, not a slice of this one.
        stale = client.get(front.url, headers={"Range": "bytes=10-", "If-Range": '"0000"'})
        assert (stale.status_code, stale.content) == (200, DATA)
        beyond = client.get(front.url, headers={"Range": f"bytes={len(DATA)}-"})
        assert beyond.status_code == 416
        assert beyond.headers["Content-Range"] == f"bytes */{len(DATA)}"


def test_head_gives_the_headers_without_the_bytes(front: Front) -> None:
    with front.client() as client:
        response = client.head(front.url)
        ranged = client.head(front.url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(DATA))
    assert response.headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert response.content == b""
    assert (ranged.status_code, ranged.headers["Content-Length"], ranged.headers["Content-Range"]) == (
        206,
        "10",
        f"bytes 10-19/{len(DATA)}",
    )


class SignedLongAgo(signing.TimestampSigner):
    def timestamp(self) -> str:
        return signing.b62_encode(int(time.time()) - settings.OPAMP_PACKAGE_URL_SECONDS - 60)


def refused_tokens(front: Front) -> dict[str, str]:
    grant = {"f": front.file_id, "a": front.agent_uid.hex}
    valid = download_token(file_id=front.file_id, instance_uid=front.agent_uid)
    return {
        "expired": SignedLongAgo(salt=SALT).sign_object(grant),
        "forged": signing.TimestampSigner(key="not the server's secret", salt=SALT).sign_object(grant),
        "altered": valid[:-1] + ("A" if valid[-1] != "A" else "B"),
        "another agent's": download_token(file_id=front.file_id, instance_uid=front.other_uid),
        "an unknown agent's": download_token(file_id=front.file_id, instance_uid=uuid.uuid4()),
    }


def test_a_token_minted_here_is_the_servers_own(front: Front) -> None:
    """The refusals below are of the tokens' faults, not of a secret the test does not share."""
    with front.client() as client:
        token = download_token(file_id=front.file_id, instance_uid=front.agent_uid)
        assert client.head(front.url_for(token)).status_code == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_expired_forged_or_other_agents_token_gets_404_and_no_bytes(front: Front, method: str) -> None:
    with front.client() as client:
        for fault, token in refused_tokens(front).items():
            response = client.request(method, front.url_for(token), headers={"Range": "bytes=0-"})
            assert response.status_code == 404, fault
            assert DATA[:64] not in response.content, fault


def test_the_internal_prefix_is_not_reachable_and_nothing_is_listed(front: Front) -> None:
    name = stored_name(front)
    directory = name.split("/")[0]
    paths = [
        PREFIX + name,
        PREFIX,
        PREFIX + directory,
        PREFIX + directory + "/",
        PREFIX.rstrip("/"),
        "/v1/package-files/",
        f"/v1/package-files/{name}",
    ]
    with front.client() as client:
        for path in paths:
            for method in ("GET", "HEAD"):
                response = client.request(method, front.nginx.base_url + path, headers={"Range": "bytes=0-"})
                assert response.status_code == 404, (method, path, response.status_code)
                assert DATA[:64] not in response.content, path
                assert name.split("/")[-1] not in response.text, path  # no listing names the file


class HandingOver(BaseHTTPRequestHandler):
    """A stand-in server that hands whatever follows /v1/package-files/ to nginx as it is:
    what nginx does with a hand-over the real server would never make."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("X-Accel-Redirect", PREFIX + self.path.removeprefix("/v1/package-files/"))
        self.send_header("ETag", '"stand-in"')
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_nginx_answers_only_regular_files_under_the_directory(tmp_path: Path, nginx_binary: str) -> None:
    package_dir = tmp_path / "packages"
    (package_dir / "7").mkdir(parents=True)
    (package_dir / "7" / "a file").write_bytes(b"bytes of a file")
    (tmp_path / "secret").write_bytes(b"outside the directory")
    files = front_files(tmp_path, "Hand-over")
    write_crl(files.agents_ca, files.crl, [])
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), HandingOver)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    nginx = Nginx.in_front(
        nginx_binary,
        tmp_path / "nginx",
        files,
        upstream=f"127.0.0.1:{upstream.server_address[1]}",
        package_files=(PREFIX, package_dir),
    )
    try:
        nginx.start()
        with httpx.Client(verify=ssl.create_default_context(cafile=str(files.server_ca)), timeout=10) as client:
            served = client.get(f"{nginx.base_url}/v1/package-files/7/a%20file")
            assert (served.status_code, served.content) == (200, b"bytes of a file")
            assert served.headers["ETag"] == '"stand-in"'
            for handed in ("7/", "7", "", "..%2Fsecret", "7/..%2F..%2Fsecret", "7/missing"):
                response = client.get(f"{nginx.base_url}/v1/package-files/{handed}")
                assert response.status_code == 404, (handed, response.status_code)
                assert b"a file" not in response.content and b"outside" not in response.content, handed
    finally:
        nginx.stop()
        upstream.shutdown()
        upstream.server_close()
        thread.join(timeout=5)
