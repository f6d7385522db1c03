"""What an agent keeps about its packages across restarts, and its JSON form.

`PackagesRecord` holds the `all_packages_hash` of the last offer the agent finished
processing, every package the server installed (its version, its hash as the server
offered it, whether it is top-level, the version kept for a revert) and the installs that
failed, with their reason. Only server-installed packages are recorded: a package
installed by other means is never reported as the server's, nor removed.

Pure: no file system access (`agent_client.state` stores the bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FailedPackage", "InstalledPackage", "PackagesRecord"]


@dataclass(frozen=True)
class InstalledPackage:
    version: str
    hash: bytes
    top_level: bool
    # The version installed before this one, kept on disk so it can be switched back to.
    previous_version: str = ""


@dataclass(frozen=True)
class FailedPackage:
    """An offered version that failed to install (or was refused), and why."""

    version: str
    hash: bytes
    error_message: str


@dataclass(frozen=True)
class PackagesRecord:
    all_packages_hash: bytes = b""
    installed: Mapping[str, InstalledPackage] = field(default_factory=dict)
    failed: Mapping[str, FailedPackage] = field(default_factory=dict)

    def with_installed(self, name: str, package: InstalledPackage) -> PackagesRecord:
        installed = {**self.installed, name: package}
        failed = {key: value for key, value in self.failed.items() if key != name}
        return PackagesRecord(self.all_packages_hash, installed, failed)

    def with_failed(self, name: str, failure: FailedPackage) -> PackagesRecord:
        return PackagesRecord(self.all_packages_hash, self.installed, {**self.failed, name: failure})

    def without(self, name: str) -> PackagesRecord:
        installed = {key: value for key, value in self.installed.items() if key != name}
        failed = {key: value for key, value in self.failed.items() if key != name}
        return PackagesRecord(self.all_packages_hash, installed, failed)

    def processed(self, all_packages_hash: bytes) -> PackagesRecord:
        return PackagesRecord(all_packages_hash, self.installed, self.failed)

    def to_json_bytes(self) -> bytes:
        document = {
            "all_packages_hash": self.all_packages_hash.hex(),
            "installed": {
                name: {
                    "version": package.version,
                    "hash": package.hash.hex(),
                    "top_level": package.top_level,
                    "previous_version": package.previous_version,
                }
                for name, package in sorted(self.installed.items())
            },
            "failed": {
                name: {"version": failure.version, "hash": failure.hash.hex(), "error_message": failure.error_message}
                for name, failure in sorted(self.failed.items())
            },
        }
        return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json_bytes(cls, data: bytes) -> PackagesRecord:
        """The record, or ValueError / KeyError / TypeError when the document is not one."""
        document = json.loads(data)
        installed = {
            _text(name): InstalledPackage(
                version=_text(entry["version"]),
                hash=bytes.fromhex(_text(entry["hash"])),
                top_level=_flag(entry["top_level"]),
                previous_version=_text(entry["previous_version"]),
            )
            for name, entry in _object(document["installed"]).items()
        }
        failed = {
            _text(name): FailedPackage(
                version=_text(entry["version"]),
                hash=bytes.fromhex(_text(entry["hash"])),
                error_message=_text(entry["error_message"]),
            )
            for name, entry in _object(document["failed"]).items()
        }
        return cls(bytes.fromhex(_text(document["all_packages_hash"])), installed, failed)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value
