"""What one client can make a server process hold, tried against the real server.

The bounds live in the server (opamp_site/server.py) as much as in the application, so
every test here talks to a live server process over sockets, as an attacker would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from django.conf import settings

from fleet.api.exceptions import REQUEST_BODY_TOO_LARGE, error_body
from fleet.consumers import CLOSE_MESSAGE_TOO_BIG, CLOSE_TIMED_OUT
from opamp.codec import decode_server_ws_frame, encode_ws_frame
from opamp.identifiers import new_instance_uid
from opamp.proto import opamp_pb2
from opamp_site.server_bounds import BODY_TIMED_OUT, HEADERS_TIMED_OUT
from tests.fleet.messages import full_report, heartbeat
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server]

MIB = 1024 * 1024
MESSAGE_LIMIT = 4 * MIB
TIMEOUT = 2.0  # the header, body and first-message timeouts of the server under test


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveOpampServer]:
    live = LiveOpampServer(
        tmp_path_factory.mktemp("bounds"),
        extra_env={
            "OPAMP_AGENT_AUTH": "required",
            "OPAMP_MAX_MESSAGE_BYTES": str(MESSAGE_LIMIT),
            "OPAMP_HTTP_HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
            "OPAMP_HTTP_BODY_TIMEOUT_SECONDS": str(TIMEOUT),
            "OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS": str(TIMEOUT),
            # A socket silent for 2 x 1.5 s after its first message is closed.
            "OPAMP_HEARTBEAT_INTERVAL_SECONDS": "1.5",
            "OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS": "2",
        },
    )
    live.start()
    try:
        yield live
    finally:
        live.close()


@pytest.fixture(scope="module")
def bearer(server: LiveOpampServer) -> bytes:
    token = server.api_post("enrollment-tokens/", {"name": "bounds", "expires_in_seconds": 600, "max_uses": 100})
    return f"Bearer {token['secret']}".encode()


def post_head(content_length: int, authorization: bytes = b"", *, keep_alive: bool = False) -> bytes:
    head = b"POST /v1/opamp HTTP/1.1\r\nHost: opamp\r\nContent-Type: application/x-protobuf\r\n"
    if not keep_alive:
        head += b"Connection: close\r\n"
    if authorization:
        head += b"Authorization: " + authorization + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % content_length


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        received += data
    return received


def seconds_to_answer(sock: socket.socket, timeout: float) -> float:
    """How long until the server starts to answer (without consuming the answer)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    sock.recv(1, socket.MSG_PEEK)
    return time.monotonic() - started


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def status(response: bytes) -> int:
    return int(status_line(response).split()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- Plain HTTP: refused from the headers ----------------------------------------------------


def test_a_post_without_a_credential_is_refused_before_its_body_is_sent(server: LiveOpampServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(60 * MIB, keep_alive=True))
        assert seconds_to_answer(sock, timeout=5) < 1
        response = read_response(sock, timeout=5)
    assert status_line(response) == b"HTTP/1.1 401 Unauthorized", response[:300]
    # The unread body must not be taken for the next request: this connection is done.
    assert b"connection: close" in response.lower()


def test_an_announced_body_over_the_limit_is_refused_at_once(server: LiveOpampServer, bearer: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(100 * MIB, bearer) + b"\x00" * 1024)
        assert seconds_to_answer(sock, timeout=5) < 1
        response = read_response(sock, timeout=5)
    assert status_line(response) == b"HTTP/1.1 413 Request Entity Too Large", response[:300]


def test_a_sender_that_writes_its_whole_body_first_still_reads_the_refusal(server: LiveOpampServer) -> None:
    # What most HTTP clients do; the unread body is discarded, not buffered, then closed.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(3 * MIB) + b"\x00" * (3 * MIB))
        response = read_response(sock, timeout=5)
    assert status_line(response) == b"HTTP/1.1 401 Unauthorized", response[:300]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server: LiveOpampServer, bearer: bytes) -> None:
    # No Content-Length to refuse from: the running total decides, and the rest is discarded.
    head = (
        b"POST /v1/opamp HTTP/1.1\r\nHost: opamp\r\nContent-Type: application/x-protobuf\r\n"
        b"Authorization: " + bearer + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (MIB, b"\x00" * MIB)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        for _ in range(MESSAGE_LIMIT // MIB + 1):
            sock.sendall(chunk)
        assert seconds_to_answer(sock, timeout=5) < 2
        response = read_response(sock, timeout=5)
    assert status_line(response) == b"HTTP/1.1 413 Request Entity Too Large", response[:300]


def test_concurrent_large_posts_without_a_credential_do_not_grow_the_process(server: LiveOpampServer) -> None:
    assert server.process is not None
    before = rss_bytes(server.process.pid)
    statuses: list[bytes] = []

    def post() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(post_head(60 * MIB))
            chunk = b"\x00" * MIB
            try:
                for _ in range(60):
                    sock.sendall(chunk)
            except OSError:
                pass  # the server may close once it answered; what it said is read below
            statuses.append(status_line(read_response(sock, timeout=10)))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    peak = before
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_bytes(server.process.pid))
        time.sleep(0.05)
    assert statuses == [b"HTTP/1.1 401 Unauthorized"] * 6
    # Stock daphne queued every body whole: 6 x 60 MiB.
    assert peak - before < 48 * MIB, f"resident memory grew by {(peak - before) / MIB:.0f} MiB"


def test_a_post_is_still_answered_after_refusals(server: LiveOpampServer, bearer: bytes) -> None:
    body = full_report(new_instance_uid(), 0).SerializeToString()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(len(body), bearer) + body)
        response = read_response(sock, timeout=5)
    assert status_line(response) == b"HTTP/1.1 200 OK", response[:300]
    reply = opamp_pb2.ServerToAgent.FromString(response.split(b"\r\n\r\n", 1)[1])
    assert not reply.HasField("error_response")


# --- Plain HTTP: timeouts ---------------------------------------------------------------------


def test_a_body_that_does_not_arrive_in_time_is_answered_408_and_closed(server: LiveOpampServer, bearer: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(1000, bearer) + b"\x0a\x10")
        started = time.monotonic()
        response = read_response(sock, timeout=TIMEOUT + 5)
        waited = time.monotonic() - started
    assert status(response) == 408, response[:300]
    assert response.endswith(BODY_TIMED_OUT) or BODY_TIMED_OUT in response
    assert TIMEOUT - 0.5 < waited < TIMEOUT + 3


def test_a_body_trickled_byte_by_byte_times_out_all_the_same(server: LiveOpampServer, bearer: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(1000, bearer))
        started = time.monotonic()
        response = b""
        sock.settimeout(0.3)
        while time.monotonic() - started < TIMEOUT + 5:
            try:
                sock.sendall(b"\x00")
                response += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if response.endswith(BODY_TIMED_OUT):
                break
    assert status(response) == 408, response[:300]
    assert time.monotonic() - started < TIMEOUT + 3


def test_trickled_headers_are_answered_408_and_closed(server: LiveOpampServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/opamp HTTP/1.1\r\nHost: opamp\r\n")
        started = time.monotonic()
        response = b""
        sock.settimeout(0.3)
        while time.monotonic() - started < TIMEOUT + 5:
            try:
                sock.sendall(b"X-Slow: a\r\n")
                response += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if response.endswith(HEADERS_TIMED_OUT):
                break
    assert status(response) == 408, response[:300]
    assert time.monotonic() - started < TIMEOUT + 3


# --- WebSocket ---------------------------------------------------------------------------------


def large_report(size: int) -> opamp_pb2.AgentToServer:
    message = full_report(new_instance_uid(), 0)
    message.effective_config.config_map.config_map[""].body = b"#" * size
    return message


async def exchange_or_close_code(server: LiveOpampServer, bearer: bytes, message: opamp_pb2.AgentToServer) -> object:
    headers = {"Authorization": bearer.decode()}
    async with websockets.connect(server.ws_url, additional_headers=headers, max_size=None) as sock:
        await sock.send(encode_ws_frame(message))
        try:
            frame = await asyncio.wait_for(sock.recv(), timeout=10)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None
    assert isinstance(frame, bytes)
    return decode_server_ws_frame(frame)


def test_a_websocket_message_under_the_limit_is_answered(server: LiveOpampServer, bearer: bytes) -> None:
    # 1.1 MiB: over daphne's own default (1 MiB), under OPAMP_MAX_MESSAGE_BYTES.
    reply = asyncio.run(exchange_or_close_code(server, bearer, large_report(int(1.1 * MIB))))
    assert isinstance(reply, opamp_pb2.ServerToAgent)
    assert not reply.HasField("error_response")


def test_a_websocket_message_over_the_limit_is_closed_with_the_documented_code(
    server: LiveOpampServer, bearer: bytes
) -> None:
    code = asyncio.run(exchange_or_close_code(server, bearer, large_report(MESSAGE_LIMIT + 1024)))
    assert code == CLOSE_MESSAGE_TOO_BIG


async def close_code_of_silent_socket(server: LiveOpampServer, bearer: bytes, *, first: bool) -> tuple[object, float]:
    headers = {"Authorization": bearer.decode()}
    async with websockets.connect(server.ws_url, additional_headers=headers) as sock:
        started = time.monotonic()  # the server's clock starts at the accept, or at the message's arrival
        if first:
            await sock.send(encode_ws_frame(full_report(new_instance_uid(), 0)))
            await asyncio.wait_for(sock.recv(), timeout=10)
        try:
            await asyncio.wait_for(sock.recv(), timeout=15)
        except websockets.ConnectionClosed as closed:
            return (closed.rcvd.code if closed.rcvd is not None else None), time.monotonic() - started
    return "still open", time.monotonic() - started


def test_a_websocket_that_never_sends_a_message_is_closed(server: LiveOpampServer, bearer: bytes) -> None:
    code, waited = asyncio.run(close_code_of_silent_socket(server, bearer, first=False))
    assert code == CLOSE_TIMED_OUT
    assert waited < TIMEOUT + 2


def test_a_websocket_that_falls_silent_is_closed_after_the_offline_timeout(
    server: LiveOpampServer, bearer: bytes
) -> None:
    code, waited = asyncio.run(close_code_of_silent_socket(server, bearer, first=True))
    assert code == CLOSE_TIMED_OUT
    assert 2.9 < waited < 3 + 2


# --- REST API ---------------------------------------------------------------------------------


def api_post(server: LiveOpampServer, path: str, payload: object) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{server.port}/api/v1/{path}",
        json=payload,
        headers={"Authorization": f"Token {server.token}"},
        timeout=30,
    )


def test_a_version_within_the_documented_file_limits_is_accepted(server: LiveOpampServer) -> None:
    # Three files of 1,000 KiB: under the 1 MiB per file and 4 MiB in total documented.
    assert api_post(server, "configurations/", {"name": "large", "selector": "service.name=large"}).status_code == 201
    files = {f"part-{n}.yaml": {"body": "#" * (1000 * 1024), "content_type": "text/yaml"} for n in range(3)}
    response = api_post(server, "configurations/large/versions/", {"files": files})
    assert response.status_code == 201, response.text[:300]


def test_a_body_over_the_api_limit_gets_a_json_413_naming_the_limit(server: LiveOpampServer) -> None:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    files = {"huge.yaml": {"body": "#" * (limit + 1), "content_type": "text/yaml"}}
    response = api_post(server, "configurations/large/versions/", {"files": files})
    assert response.status_code == 413, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.json() == error_body(REQUEST_BODY_TOO_LARGE.format(limit=limit), field=None)


def test_a_websocket_that_keeps_reporting_stays_open(server: LiveOpampServer, bearer: bytes) -> None:
    async def report_for(seconds: float) -> int:
        uid = new_instance_uid()
        headers = {"Authorization": bearer.decode()}
        replies = 0
        async with websockets.connect(server.ws_url, additional_headers=headers) as sock:
            started = time.monotonic()
            sequence = 0
            while time.monotonic() - started < seconds:
                message = full_report(uid, 0) if sequence == 0 else heartbeat(uid, sequence)
                await sock.send(encode_ws_frame(message))
                await asyncio.wait_for(sock.recv(), timeout=10)
                replies += 1
                sequence += 1
                await asyncio.sleep(1)
        return replies

    # Twice the offline timeout (2 x 1.5 s) and then some, with a message every second.
    assert asyncio.run(report_for(7)) >= 6


def test_requests_on_a_kept_alive_connection_are_each_answered(server: LiveOpampServer, bearer: bytes) -> None:
    body = full_report(new_instance_uid(), 0).SerializeToString()
    agent_headers = {"Authorization": bearer.decode(), "Content-Type": "application/x-protobuf"}
    api_headers = {"Authorization": f"Token {server.token}"}
    ports = set()
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
        responses = []
        for _ in range(2):
            responses.append(client.post("/v1/opamp", content=body, headers=agent_headers))
            responses.append(client.get("/api/v1/agents/", headers=api_headers))
        # Longer than the header timeout between two requests: an idle connection is not cut.
        time.sleep(TIMEOUT + 0.5)
        responses.append(client.get("/api/v1/agents/", headers=api_headers))
        for response in responses:
            assert response.status_code == 200
            ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1  # one connection carried them all
