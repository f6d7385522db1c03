"""What the package tests share: a packages storage in a temporary directory, a signing
key, and packages made through the services."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from channels.testing import ApplicationCommunicator

from fleet.models import Agent
from rollouts import packages
from rollouts.models import Package, PackageFile, PackageVersion, Rollout
from rollouts.rollout_services.creation import StageSpec, package_rollout_create
from rollouts.rollout_services.verbs import rollout_start
from signing.config_signing import SigningKeyPair, generate_signing_key
from tests.rollouts.rollout_helpers import make_fleet

STORAGES_BASE = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}


@pytest.fixture
def package_dir(tmp_path: Path, settings: Any) -> Path:
    directory = tmp_path / "packages"
    settings.STORAGES = {
        **STORAGES_BASE,
        "packages": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(directory)}},
    }
    return directory


@pytest.fixture
def signing_key(tmp_path: Path, settings: Any) -> SigningKeyPair:
    path = tmp_path / "signing-key.pem"
    pair = generate_signing_key(path)
    settings.OPAMP_SIGNING_KEY_FILE = str(path)
    return pair


def stored_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file()) if directory.exists() else []


def make_version(
    name: str = "collector",
    version: str = "1.0.0",
    *,
    files: dict[tuple[str, str], bytes] | None = None,
    type: str = "top_level",
) -> PackageVersion:
    package = Package.objects.filter(name=name).first() or packages.package_create(name=name, type=type, actor=None)
    row = packages.package_version_create(package=package, version=version, actor=None)
    for (os, arch), data in (files if files is not None else {("", ""): b"bytes of " + version.encode()}).items():
        packages.package_file_upload(version=row, source=io.BytesIO(data), os=os, arch=arch, actor=None)
    return row


def file_of(version: PackageVersion, os: str = "", arch: str = "") -> PackageFile:
    return PackageFile.objects.get(version=version, os=os, arch=arch)


def http_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None, host: bytes = b"testserver") -> dict:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": [(b"host", host), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def asgi_get(
    application: Any, path: str, headers: list[tuple[bytes, bytes]] | None = None, host: bytes = b"testserver"
) -> tuple[int, dict[bytes, bytes], bytes]:
    """GET through an ASGI application: (status, headers, body). (channels' HttpCommunicator
    does not take a last body message without a body, which ASGI allows and Django sends.)"""
    communicator = ApplicationCommunicator(application, http_scope(path, headers, host))
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(timeout=10)
    body = b""
    while True:
        message = await communicator.receive_output(timeout=10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(timeout=10)
    return start["status"], dict(start["headers"]), body


def package_statuses(status: str, *, has: str, offered: str, error: str = "") -> dict[str, Any]:
    """A PackageStatuses of package "collector" as fleet.reports.package_statuses_to_dict stores it."""
    entry = {
        "agent_has_version": has,
        "agent_has_hash": "aa" if has else "",
        "server_offered_version": offered,
        "server_offered_hash": "bb",
        "status": status,
        "error_message": error,
    }
    return {"packages": {"collector": entry}, "server_provided_all_packages_hash": "", "error_message": ""}


def report(agent: Agent, status: str, *, has: str, offered: str, error: str = "") -> None:
    """Store what the agent's PackageStatuses would on its row, and nothing else: no answer
    is recorded on a rollout target (the gate then counts from the status itself)."""
    document = package_statuses(status, has=has, offered=offered, error=error)
    Agent.objects.filter(pk=agent.pk).update(package_statuses=document)


def collector_fleet(count: int) -> list[Agent]:
    """`count` agents (env=prod) an assignment gives collector 1.0.0; 2.0.0 exists too."""
    make_version(version="1.0.0")
    make_version(version="2.0.0")
    package = Package.objects.get()
    packages.package_assignment_create(name="all", package=package, version="1.0.0", selector="env=prod", actor=None)
    return make_fleet(count)


def started_package_rollout(stages: list[StageSpec], **options: Any) -> Rollout:
    """A rollout of collector 2.0.0 over `stages` (salt "fixed"), started."""
    package = Package.objects.get(name="collector")
    rollout = package_rollout_create(
        package=package,
        candidate=package.versions.get(version="2.0.0"),
        stages=stages,
        actor=None,
        salt="fixed",
        **options,
    )
    assert rollout_start(rollout=rollout, actor=None)
    return rollout
