"""Package file bytes: streamed into the `packages` storage with their SHA-256 and size
computed on the way, signed, and opened again for download.

Everything goes through Django's storage API (`STORAGES["packages"]`), so a local
directory and an object store serve alike. The bytes are never held whole in memory:
an upload is hashed, counted and written chunk by chunk, and refused as soon as it passes
OPAMP_PACKAGE_MAX_BYTES (what was written is deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages

from fleet.errors import DomainError
from opamp.package_signature import PackageEnvelope, SignedPackageFile, sign_package_file
from signing.signing_keys import signing_key_pair_for_new_signature

PACKAGE_STORAGE = "packages"
CHUNK_BYTES = 256 * 1024

PACKAGE_TOO_LARGE = "the package file is larger than the {limit} bytes allowed (OPAMP_PACKAGE_MAX_BYTES)"
PACKAGE_EMPTY = "the package file is empty"


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def package_storage() -> Storage:
    return storages[PACKAGE_STORAGE]


def package_storage_directory() -> Path | None:
    """The local directory the packages storage keeps its files in (a stored name is a path
    under it); None for any other backend."""
    storage = package_storage()
    return Path(storage.location) if isinstance(storage, FileSystemStorage) else None


class _CountingReader(io.RawIOBase):
    """Reads `source` once, front to back, hashing and counting; refuses past `limit`.

    A storage backend reads it through `File.chunks()` or `read()`; either way every byte
    it stores has passed through the hash, so the SHA-256 is of exactly the bytes stored.
    """

    def __init__(self, source: Readable, limit: int) -> None:
        super().__init__()
        self.source = source
        self.limit = limit
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.source.read(min(len(buffer), CHUNK_BYTES))
        if not data:
            return 0
        self.size += len(data)
        if self.size > self.limit:
            raise DomainError(PACKAGE_TOO_LARGE.format(limit=self.limit), status=413)
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class StoredFile:
    storage_name: str
    size: int
    sha256: str


def store_package_file(source: Readable, *, package_id: int, limit: int | None = None) -> StoredFile:
    """Stream `source` into the packages storage under a fresh, unguessable name.

    Raises DomainError 413 past `limit` (OPAMP_PACKAGE_MAX_BYTES) and 400 when empty;
    nothing is left in the storage then.
    """
    limit = settings.OPAMP_PACKAGE_MAX_BYTES if limit is None else limit
    reader = _CountingReader(source, limit)
    storage = package_storage()
    wanted = f"{package_id}/{uuid.uuid4().hex}"
    try:
        name = storage.save(wanted, File(io.BufferedReader(reader, CHUNK_BYTES), name=wanted))
    except DomainError:
        _delete_quietly(storage, wanted)
        raise
    if reader.size == 0:
        _delete_quietly(storage, name)
        raise DomainError(PACKAGE_EMPTY, field="file")
    return StoredFile(storage_name=name, size=reader.size, sha256=reader.digest.hexdigest())


def delete_stored_file(storage_name: str) -> None:
    _delete_quietly(package_storage(), storage_name)


def _delete_quietly(storage: Storage, name: str) -> None:
    with contextlib.suppress(OSError):  # nothing written, or already gone
        storage.delete(name)


def open_package_file(storage_name: str) -> IO[bytes]:
    """The stored bytes, for reading (the caller closes)."""
    handle: IO[bytes] = package_storage().open(storage_name, "rb")
    return handle


def sign_package(*, package: str, version: str, sha256: str) -> SignedPackageFile | None:
    """The signature document for these bytes of this package version, with the configured
    signing key (signing.signing_keys); None when no signing key is configured."""
    pair = signing_key_pair_for_new_signature()
    if pair is None:
        return None
    envelope = PackageEnvelope(package=package, version=version, sha256=sha256, key_id=pair.key_id)
    return sign_package_file(envelope, pair.private_key.sign)
