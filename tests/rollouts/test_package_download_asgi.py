"""Packages through the site's ASGI application, as daphne runs it: an upload streamed to
storage, and a download streamed in chunks, cut half-way by the agent and resumed with
Range to the exact bytes."""

from __future__ import annotations

import hashlib
import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.urls import reverse
from rest_framework.authtoken.models import Token

from fleet.roles import OPERATOR, grant_role
from opamp_site.asgi import application
from rollouts import packages
from rollouts.models import Package
from rollouts.package_downloads import download_token
from rollouts.package_files import CHUNK_BYTES
from tests.fleet import factories
from tests.rollouts.package_helpers import asgi_get, file_of, http_scope, make_version, package_dir, stored_files  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

DATA = bytes(range(251)) * 20_000  # about 5 MB: many chunks


@database_sync_to_async
def offered_url() -> str:
    version = make_version(files={("", ""): DATA})
    packages.package_assignment_create(
        name="everyone", package=Package.objects.get(), version="1.0.0", selector="", actor=None
    )
    agent = factories.AgentFactory()
    token = download_token(file_id=file_of(version).pk, instance_uid=agent.instance_uid)
    return reverse("package-download", kwargs={"token": token})


async def test_a_download_cut_half_way_resumes_with_range_to_the_exact_bytes(package_dir):  # noqa: F811
    path = await offered_url()
    communicator = ApplicationCommunicator(application, http_scope(path))
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(timeout=10)
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"Content-Length"] == str(len(DATA)).encode()
    received = b""
    while len(received) < len(DATA) // 2:
        message = await communicator.receive_output(timeout=10)
        assert len(message["body"]) <= CHUNK_BYTES  # sent as it is read, never whole
        assert message.get("more_body")
        received += message["body"]
    await communicator.send_input({"type": "http.disconnect"})  # the agent's connection drops
    await communicator.wait(timeout=10)

    range_headers = [(b"range", f"bytes={len(received)}-".encode()), (b"if-range", headers[b"ETag"])]
    status, resumed_headers, rest = await asgi_get(application, path, range_headers)
    assert status == 206
    assert resumed_headers[b"Content-Range"] == f"bytes {len(received)}-{len(DATA) - 1}/{len(DATA)}".encode()
    assert received + rest == DATA


@database_sync_to_async
def operator_token() -> str:
    user = factories.UserFactory(username="uploader")
    grant_role(user=user, role=OPERATOR)
    make_version(files={})
    return Token.objects.create(user=user).key


async def upload(path: str, token: str, chunks: list[bytes], declared: int | None) -> tuple[int, bytes]:
    headers = [(b"authorization", f"Token {token}".encode()), (b"content-type", b"application/octet-stream")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    communicator = ApplicationCommunicator(application, {**http_scope(path, headers), "method": "POST"})
    for index, chunk in enumerate(chunks):
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1})
    start = await communicator.receive_output(timeout=10)
    body = b""
    while True:
        message = await communicator.receive_output(timeout=10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(timeout=10)
    return start["status"], body


async def test_an_upload_streams_through_the_site_to_storage(package_dir):  # noqa: F811
    token = await operator_token()
    chunks = [DATA[i : i + 65536] for i in range(0, len(DATA), 65536)]
    status, body = await upload("/api/v1/packages/collector/versions/1.0.0/files/", token, chunks, len(DATA))
    assert status == 201, body
    assert json.loads(body)["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert [p.stat().st_size for p in stored_files(package_dir)] == [len(DATA)]
