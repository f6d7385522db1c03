"""Package downloads: a signed, expiring URL per agent and file; Range requests (206, 416),
HEAD, the exact length and the SHA-256 as ETag; anything else a 404."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core import signing
from django.test import Client
from django.urls import reverse

from fleet.models import Agent
from rollouts import packages
from rollouts.models import Package, PackageAssignment, PackageFile
from rollouts.package_downloads import SALT, byte_range, download_token, download_url, read_download_token
from tests.fleet import factories
from tests.rollouts.package_helpers import file_of, make_version, package_dir  # noqa: F401

pytestmark = pytest.mark.django_db

DATA = bytes(range(256)) * 4096 + b"end"  # 1 MiB and 3 bytes: several storage chunks


@pytest.fixture
def offered(package_dir: Any) -> tuple[Agent, PackageFile]:  # noqa: F811
    version = make_version(files={("linux", "amd64"): DATA, ("", ""): b"other platforms"})
    packages.package_assignment_create(
        name="everyone", package=Package.objects.get(), version="1.0.0", selector="", actor=None
    )
    agent = factories.AgentFactory(
        identifying_attributes={"service.name": "a"},
        non_identifying_attributes={"os.type": "linux", "host.arch": "amd64"},
    )
    return agent, file_of(version, "linux", "amd64")


def url_for(agent: Agent, file: PackageFile) -> str:
    return reverse(
        "package-download", kwargs={"token": download_token(file_id=file.pk, instance_uid=agent.instance_uid)}
    )


def body(response: Any) -> bytes:
    assert response.is_async  # an asynchronous iterator: ASGI streams it chunk by chunk

    async def collect() -> bytes:
        return b"".join([part async for part in response.streaming_content])

    return async_to_sync(collect)()


def test_the_whole_file_with_its_length_and_etag(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    response = Client().get(url_for(agent, file))
    assert response.status_code == 200
    assert body(response) == DATA
    assert response["Content-Length"] == str(len(DATA))
    assert response["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert response["Accept-Ranges"] == "bytes"


def test_head_gives_the_headers_without_the_bytes(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    response = Client().head(url_for(agent, file))
    assert response.status_code == 200
    assert response["Content-Length"] == str(len(DATA))
    assert response.content == b""
    ranged = Client().head(url_for(agent, file), HTTP_RANGE="bytes=10-19")
    assert (ranged.status_code, ranged["Content-Length"], ranged["Content-Range"]) == (
        206,
        "10",
        f"bytes 10-19/{len(DATA)}",
    )


@pytest.mark.parametrize(
    ("header", "status", "expected"),
    [
        ("bytes=0-0", 206, DATA[:1]),
        ("bytes=-3", 206, b"end"),
        (f"bytes=100-{len(DATA) + 50}", 206, DATA[100:]),
        ("bytes=5-2", 200, DATA),  # invalid: ignored
        ("bytes=0-1,5-6", 200, DATA),  # several ranges: the whole file
        ("items=0-1", 200, DATA),
    ],
)
def test_ranges(offered: tuple[Agent, PackageFile], header: str, status: int, expected: bytes) -> None:
    agent, file = offered
    response = Client().get(url_for(agent, file), HTTP_RANGE=header)
    assert response.status_code == status
    assert body(response) == expected
    assert response["Content-Length"] == str(len(expected))


def test_an_unsatisfiable_range_is_416(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    response = Client().get(url_for(agent, file), HTTP_RANGE=f"bytes={len(DATA)}-")
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(DATA)}"
    assert Client().get(url_for(agent, file), HTTP_RANGE="bytes=-0").status_code == 416


def test_a_stale_if_range_gets_the_whole_file(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    response = Client().get(url_for(agent, file), HTTP_RANGE="bytes=10-", HTTP_IF_RANGE='"0000"')
    assert response.status_code == 200
    assert body(response) == DATA


def test_an_expired_url_is_refused(offered: tuple[Agent, PackageFile], settings: Any) -> None:
    agent, file = offered
    url = url_for(agent, file)
    settings.OPAMP_PACKAGE_URL_SECONDS = 0
    time.sleep(1.1)
    assert Client().get(url).status_code == 404
    settings.OPAMP_PACKAGE_URL_SECONDS = 3600
    assert Client().get(url).status_code == 200


def test_a_forged_or_altered_token_is_refused(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    token = download_token(file_id=file.pk, instance_uid=agent.instance_uid)
    assert read_download_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    forged = signing.TimestampSigner(key="not the server's secret", salt=SALT).sign_object(
        {"f": file.pk, "a": agent.instance_uid.hex}
    )
    for bad in (token[:-1] + ("A" if token[-1] != "A" else "B"), forged, "nothing", ""):
        url = reverse("package-download", kwargs={"token": bad}) if bad else "/v1/package-files/"
        assert Client().get(url).status_code == 404


def test_another_agents_url_or_another_file_is_refused(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    other_file = PackageFile.objects.exclude(pk=file.pk).get()
    # The platform-neutral file is not what this linux/amd64 agent was offered.
    assert Client().get(url_for(agent, other_file)).status_code == 404
    # A windows agent was offered the platform-neutral file, not the linux one.
    windows = factories.AgentFactory(non_identifying_attributes={"os.type": "windows", "host.arch": "amd64"})
    assert Client().get(url_for(windows, other_file)).status_code == 200
    assert Client().get(url_for(windows, file)).status_code == 404
    # An unknown agent, and an agent the package is no longer assigned to.
    stranger = Agent(instance_uid=uuid.uuid4())
    assert Client().get(url_for(stranger, file)).status_code == 404
    packages.package_assignment_update(assignment=PackageAssignment.objects.get(), selector="env=nowhere", actor=None)
    assert Client().get(url_for(agent, file)).status_code == 404


def test_the_offer_url_is_absolute_on_the_agents_scheme_and_host(
    offered: tuple[Agent, PackageFile], settings: Any
) -> None:
    agent, file = offered
    url = download_url(base="https://opamp.example", file_id=file.pk, instance_uid=agent.instance_uid)
    assert url.startswith("https://opamp.example/v1/package-files/")
    assert read_download_token(url.rsplit("/", 1)[1]).file_id == file.pk


def test_only_get_and_head(offered: tuple[Agent, PackageFile]) -> None:
    agent, file = offered
    assert Client().post(url_for(agent, file)).status_code == 405


def test_byte_range_parsing() -> None:
    assert byte_range("", 10) is None
    assert byte_range("bytes=2-4", 10) == (2, 4)
    assert byte_range("bytes=2-", 10) == (2, 9)
    assert byte_range("bytes=-20", 10) == (0, 9)
    assert byte_range("bytes=10-", 10) is False
    assert byte_range("bytes=-", 10) is None


def test_behind_nginx_the_file_is_handed_over_after_the_token_is_checked(
    offered: tuple[Agent, PackageFile], settings: Any
) -> None:
    agent, file = offered
    settings.OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX = "/_internal/package-files/"
    for method in ("get", "head"):
        response = getattr(Client(), method)(url_for(agent, file), HTTP_RANGE="bytes=10-19")
        assert response.status_code == 200  # nginx answers the Range from the file
        assert response["X-Accel-Redirect"] == f"/_internal/package-files/{file.storage_name}"
        assert response.content == b""
        assert response["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
        assert response["Content-Type"] == "application/octet-stream"
        assert response["Cache-Control"] == "private, no-store"
    windows = factories.AgentFactory(non_identifying_attributes={"os.type": "windows", "host.arch": "amd64"})
    refused = Client().get(url_for(windows, file))
    assert refused.status_code == 404 and "X-Accel-Redirect" not in refused


def test_a_storage_that_is_not_a_directory_keeps_streaming_through_the_app(settings: Any) -> None:
    settings.STORAGES = {**settings.STORAGES, "packages": {"BACKEND": "django.core.files.storage.InMemoryStorage"}}
    settings.OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX = "/_internal/package-files/"
    version = make_version(files={("", ""): DATA})
    packages.package_assignment_create(
        name="everyone", package=Package.objects.get(), version="1.0.0", selector="", actor=None
    )
    response = Client().get(url_for(factories.AgentFactory(), file_of(version)), HTTP_RANGE="bytes=100-")
    assert "X-Accel-Redirect" not in response
    assert (response.status_code, body(response)) == (206, DATA[100:])
