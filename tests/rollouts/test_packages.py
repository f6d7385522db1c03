"""Packages, versions and files: uploads streamed to storage with their SHA-256, the size
limit, immutability, roles, the signature and the read API."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from rest_framework.test import APIClient

from fleet.errors import DomainError
from fleet.models import AuditEvent
from opamp.config_signature import key_id_for, load_public_key_pem
from opamp.package_signature import PackageContentMismatch, PackageMismatch, verify_package_file
from rollouts import packages
from rollouts.models import Package, PackageFile, PackageVersion
from rollouts.package_files import PACKAGE_TOO_LARGE, open_package_file
from tests.rollouts.package_helpers import file_of, make_version, package_dir, signing_key, stored_files  # noqa: F401

pytestmark = pytest.mark.django_db

API = "/api/v1"
DATA = bytes(range(256)) * 1000 + b"\x00tail"


def create_package(api: APIClient, name: str = "collector", version: str = "1.0.0") -> None:
    assert api.post(f"{API}/packages/", {"name": name, "type": "addon"}, format="json").status_code == 201
    assert api.post(f"{API}/packages/{name}/versions/", {"version": version}, format="json").status_code == 201


def upload(api: APIClient, data: bytes, query: str = "", name: str = "collector", version: str = "1.0.0") -> Any:
    url = f"{API}/packages/{name}/versions/{version}/files/{query}"
    return api.post(url, data, content_type="application/octet-stream")


def test_an_upload_is_stored_with_the_sha256_and_size_of_the_exact_bytes(api, package_dir, signing_key):  # noqa: F811
    create_package(api)
    response = upload(api, DATA, "?os=linux&arch=amd64")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["os"], body["arch"], body["size"]) == ("linux", "amd64", len(DATA))
    assert body["sha256"] == hashlib.sha256(DATA).hexdigest()
    file = PackageFile.objects.get()
    with open_package_file(file.storage_name) as handle:
        assert handle.read() == DATA
    assert [path.relative_to(package_dir).as_posix() for path in stored_files(package_dir)] == [file.storage_name]
    actions = list(
        AuditEvent.objects.filter(action__startswith="package.").order_by("id").values_list("action", flat=True)
    )
    assert actions == ["package.create", "package.version.create", "package.file.upload"]
    uploaded = AuditEvent.objects.get(action="package.file.upload").details
    assert (uploaded["sha256"], uploaded["size"], uploaded["platform"]) == (body["sha256"], len(DATA), "linux/amd64")


def test_the_signature_verifies_with_the_published_public_key(api, package_dir, signing_key):  # noqa: F811
    create_package(api)
    upload(api, DATA)
    published = api.get(f"{API}/signing-keys/").json()
    keys = published["results"] if isinstance(published, dict) else published
    trusted = {}
    for key in keys:
        public = load_public_key_pem(key["public_key_pem"])
        trusted[key_id_for(public)] = public
    assert signing_key.key_id in trusted
    file = PackageFile.objects.get()
    document = file.signature.encode()
    sha = hashlib.sha256(DATA).hexdigest()
    envelope = verify_package_file(
        document, package="collector", version="1.0.0", content_sha256=sha, trusted_keys=trusted
    )
    assert (envelope.package, envelope.version, envelope.sha256, envelope.key_id) == (
        "collector",
        "1.0.0",
        sha,
        signing_key.key_id,
    )
    with pytest.raises(PackageContentMismatch):
        verify_package_file(
            document, package="collector", version="1.0.0", content_sha256="0" * 64, trusted_keys=trusted
        )
    with pytest.raises(PackageMismatch):
        verify_package_file(document, package="collector", version="2.0.0", content_sha256=sha, trusted_keys=trusted)


def test_without_a_signing_key_files_are_stored_unsigned(api, package_dir, settings):  # noqa: F811
    settings.OPAMP_SIGNING_KEY_FILE = ""
    create_package(api)
    assert upload(api, DATA).status_code == 201
    assert PackageFile.objects.get().signature == ""


def test_a_body_over_the_limit_is_refused_with_413_and_nothing_is_stored(api, package_dir, settings):  # noqa: F811
    settings.OPAMP_PACKAGE_MAX_BYTES = 1000
    create_package(api)
    response = upload(api, b"x" * 1001)
    assert response.status_code == 413
    assert response.json()["detail"] == PACKAGE_TOO_LARGE.format(limit=1000)
    assert PackageFile.objects.count() == 0
    assert stored_files(package_dir) == []
    assert upload(api, b"x" * 1000).status_code == 201


def test_the_limit_holds_while_streaming_whatever_length_was_declared(package_dir, settings):  # noqa: F811
    settings.OPAMP_PACKAGE_MAX_BYTES = 300_000
    version = make_version(files={})
    with pytest.raises(DomainError) as refused:
        packages.package_file_upload(version=version, source=io.BytesIO(b"y" * 300_001), actor=None)
    assert refused.value.status == 413
    assert stored_files(package_dir) == []
    assert PackageFile.objects.count() == 0


def test_a_second_file_for_the_same_platform_is_refused_with_409(api, package_dir):  # noqa: F811
    create_package(api)
    assert upload(api, b"first", "?os=linux&arch=amd64").status_code == 201
    response = upload(api, b"second", "?os=linux&arch=amd64")
    assert response.status_code == 409
    assert "files are immutable" in response.json()["detail"]
    assert upload(api, b"other platform", "?os=linux&arch=arm64").status_code == 201
    assert upload(api, b"any platform").status_code == 201
    assert len(stored_files(package_dir)) == 3


def test_a_duplicate_package_or_version_is_refused_with_409(api, package_dir):  # noqa: F811
    create_package(api)
    assert api.post(f"{API}/packages/", {"name": "collector"}, format="json").status_code == 409
    response = api.post(f"{API}/packages/collector/versions/", {"version": "1.0.0"}, format="json")
    assert response.status_code == 409
    assert PackageVersion.objects.count() == 1


def test_viewers_read_but_do_not_upload(api, viewer_api, package_dir):  # noqa: F811
    create_package(api)
    assert upload(viewer_api, DATA).status_code == 403
    assert viewer_api.post(f"{API}/packages/", {"name": "other"}, format="json").status_code == 403
    assert viewer_api.get(f"{API}/packages/").status_code == 200
    assert APIClient().get(f"{API}/packages/").status_code == 401
    assert stored_files(package_dir) == []


def test_unsafe_text_in_a_platform_or_name_is_a_clear_400(api, package_dir):  # noqa: F811
    create_package(api)
    response = upload(api, DATA, "?os=li%00nux")
    assert response.status_code == 400
    assert response.json()["field"] == "os"
    with pytest.raises(DomainError) as refused:
        packages.package_file_upload(
            version=PackageVersion.objects.get(), source=io.BytesIO(DATA), os="a\x00", actor=None
        )
    assert refused.value.field == "os"
    with pytest.raises(DomainError) as refused:
        packages.package_file_upload(
            version=PackageVersion.objects.get(), source=io.BytesIO(DATA), arch="\ud800", actor=None
        )
    assert refused.value.field == "arch"
    assert api.get(f"{API}/packages/col%00lector/").status_code == 400
    assert stored_files(package_dir) == []


def test_an_empty_body_is_refused(api, package_dir):  # noqa: F811
    create_package(api)
    assert upload(api, b"").status_code == 400


def test_the_read_api_lists_packages_versions_and_files_only(api, package_dir):  # noqa: F811
    create_package(api)
    upload(api, DATA, "?os=linux&arch=amd64")
    listing = api.get(f"{API}/packages/").json()
    assert [(p["name"], p["type"], p["versions"]) for p in listing["results"]] == [("collector", "addon", ["1.0.0"])]
    version = api.get(f"{API}/packages/collector/versions/1.0.0/").json()
    assert [(f["os"], f["arch"], f["size"]) for f in version["files"]] == [("linux", "amd64", len(DATA))]
    assert "storage_name" not in version["files"][0]
    assert api.get(f"{API}/packages/collector/versions/9.9/").status_code == 404
    assert api.get(f"{API}/packages/nothing/").status_code == 404


def test_package_names_follow_the_path_segment_rule(api, package_dir):  # noqa: F811
    assert api.post(f"{API}/packages/", {"name": "a/b"}, format="json").status_code == 400
    assert api.post(f"{API}/packages/", {"name": ""}, format="json").status_code == 400
    assert Package.objects.count() == 0


def test_a_version_made_through_the_services_is_readable_back(package_dir: Path):  # noqa: F811
    version = make_version(files={("linux", "amd64"): b"abc"})
    with open_package_file(file_of(version, "linux", "amd64").storage_name) as handle:
        assert handle.read() == b"abc"


def test_the_admin_uploads_a_file_through_the_service(admin_client, package_dir, signing_key):  # noqa: F811
    version = make_version(files={})
    upload_file = SimpleUploadedFile("collector.tar.gz", DATA, content_type="application/gzip")
    response = admin_client.post(
        reverse("admin:rollouts_packagefile_add"),
        {"version": version.pk, "os": "linux", "arch": "arm64", "file": upload_file},
    )
    assert response.status_code == 302, response.content[:2000]
    file = PackageFile.objects.get()
    assert (file.os, file.arch, file.size) == ("linux", "arm64", len(DATA))
    assert file.sha256 == hashlib.sha256(DATA).hexdigest()
    assert file.key_id == signing_key.key_id
    assert AuditEvent.objects.filter(action="package.file.upload").count() == 1
    # A second file for that platform is refused as a message, nothing stored.
    again = SimpleUploadedFile("x", b"other", content_type="application/gzip")
    form = {"version": version.pk, "os": "linux", "arch": "arm64", "file": again}
    admin_client.post(reverse("admin:rollouts_packagefile_add"), form)
    assert PackageFile.objects.count() == 1
    assert len(stored_files(package_dir)) == 1
    assert admin_client.get(reverse("admin:rollouts_packagefile_change", args=[file.pk])).status_code == 200
