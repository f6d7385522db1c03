"""Package offers as the server builds them, for the agent_client package tests: files served
by a local `FileServer`, hashed and signed; and waiting for the agent to process one."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_client.testing import FakeHttpServer, FakeWebSocketServer
from opamp.config_signature import key_id_for
from opamp.package_signature import PackageEnvelope, sign_package_file
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.file_server import FileServer

INSTALLED = pb.PackageStatusEnum_Installed
PENDING = pb.PackageStatusEnum_InstallPending
INSTALLING = pb.PackageStatusEnum_Installing
FAILED = pb.PackageStatusEnum_InstallFailed
DOWNLOADING = pb.PackageStatusEnum_Downloading


@dataclass
class Offered:
    name: str
    version: str
    body: bytes
    signer: Ed25519PrivateKey | None = None
    signed_body: bytes | None = None  # the bytes the signature vouches for, if not `body`
    content_hash: bytes | None = None  # the hash the offer announces, if not the body's


def offer(files: FileServer, key: Ed25519PrivateKey, *packages: Offered) -> pb.PackagesAvailable:
    """What the server sends: each file served by `files`, hashed and signed as the server does."""
    message = pb.PackagesAvailable()
    for package in packages:
        path = f"/packages/{package.name}/{package.version}"
        files.files[path] = package.body
        signer = package.signer or key
        signed_digest = hashlib.sha256(package.body if package.signed_body is None else package.signed_body)
        envelope = PackageEnvelope(
            package=package.name,
            version=package.version,
            sha256=signed_digest.hexdigest(),
            key_id=key_id_for(signer.public_key()),
        )
        content_hash = package.content_hash or hashlib.sha256(package.body).digest()
        entry = message.packages[package.name]
        entry.type = pb.PackageType_TopLevel
        entry.version = package.version
        entry.hash = hashlib.sha256(package.name.encode() + b"\0" + package.version.encode() + content_hash).digest()
        entry.file.download_url = files.url(path)
        entry.file.content_hash = content_hash
        entry.file.signature = sign_package_file(envelope, signer.sign).to_json_bytes()
        entry.file.headers.headers.add(key="Authorization", value="Bearer download-token")
    message.all_packages_hash = hashlib.sha256(b"".join(p.hash for _, p in sorted(message.packages.items()))).digest()
    return message


def has_statuses(message: pb.AgentToServer) -> bool:
    return message.HasField("package_statuses")


async def until_processed(
    server: FakeWebSocketServer | FakeHttpServer, available: pb.PackagesAvailable
) -> list[pb.PackageStatuses]:
    """Every package_statuses the agent sends until it reports the offer processed."""
    reports: list[pb.PackageStatuses] = []
    while True:
        message = await server.next_matching(has_statuses, timeout=5)
        reports.append(message.package_statuses)
        if message.package_statuses.server_provided_all_packages_hash == available.all_packages_hash:
            return reports
