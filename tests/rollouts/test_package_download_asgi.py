"""A package download through the site's ASGI application, as daphne runs it: streamed in
chunks, cut half-way by the agent, and resumed with Range to the exact bytes."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.urls import reverse

from opamp_site.asgi import application
from rollouts import packages
from rollouts.models import Package
from rollouts.package_downloads import download_token
from rollouts.package_files import CHUNK_BYTES
from tests.fleet import factories
from tests.rollouts.package_helpers import asgi_get, file_of, http_scope, make_version, package_dir  # noqa: F401

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
