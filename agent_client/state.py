"""What an agent keeps across restarts: its instance_uid and what it did with remote config.

`FileState` lays it out under a state directory:

    <state-dir>/instance_uid         the instance_uid as a canonical UUID string
    <state-dir>/remote_config.json   last received hash, status, error, applied hash, file list,
                                     the signing (sequence, config hash) applied last per
                                     configuration
    <state-dir>/config/<name>        the applied config files, and nothing else
    <state-dir>/packages.json        the packages the server installed, failed installs and
                                     the last offer processed (`agent_client.package_record`)

`MemoryState` keeps the same facts in memory, for simulated fleets.

Every file is written atomically (temporary file in the same directory, fsync, os.replace,
fsync of the directory), so a crash leaves either the old or the new content.
`remote_config.json` is written after the config files: it is the commit point of an apply.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent_client.package_record import PackagesRecord
from agent_client.remote_config import ConfigFile, ConfigRejected, disk_name
from opamp.config_signature import AppliedSigning
from opamp.identifiers import instance_uid_problem
from opamp.proto import opamp_pb2 as pb

INSTANCE_UID_FILE = "instance_uid"
REMOTE_CONFIG_FILE = "remote_config.json"
PACKAGES_FILE = "packages.json"
SIGNINGS_KEY = "signed_config_sequences"
LEGACY_SIGNINGS_KEY = "signed_config_versions"
CONFIG_DIR = "config"
_TEMP_PREFIX = ".tmp-"

# Only terminal statuses are persisted: an agent that dies while APPLYING reports the
# previous outcome after a restart, so the server sees the old hash and offers the new
# config again instead of waiting forever for an apply that will never finish.
_STATUS_NAMES = {
    pb.RemoteConfigStatuses_UNSET: "UNSET",
    pb.RemoteConfigStatuses_APPLIED: "APPLIED",
    pb.RemoteConfigStatuses_FAILED: "FAILED",
}
_STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}


class StateError(Exception):
    """The state directory holds something the agent cannot use; it will not guess."""


@dataclass(frozen=True)
class RemoteConfigRecord:
    """The agent's remote-config facts.

    `last_hash` is the last `config_hash` received, whatever came of it (the spec's
    `last_remote_config_hash`); `applied_hash` and `files` describe the config in effect.
    `signings` is the signing applied last per configuration name (sequences only go
    up): a signed config under a lower sequence is a replay and refused.
    """

    last_hash: bytes = b""
    status: pb.RemoteConfigStatuses = pb.RemoteConfigStatuses_UNSET
    error_message: str = ""
    applied_hash: bytes = b""
    files: Mapping[str, ConfigFile] = field(default_factory=dict)
    signings: Mapping[str, AppliedSigning] = field(default_factory=dict)


class AgentState(Protocol):
    def load_instance_uid(self) -> bytes | None: ...

    def save_instance_uid(self, instance_uid: bytes) -> None: ...

    def load_remote_config(self) -> RemoteConfigRecord: ...

    def install_config(self, files: Mapping[str, ConfigFile]) -> None:
        """Make `files` the agent's config files; raise OSError when that fails."""
        ...

    def save_remote_config(self, record: RemoteConfigRecord) -> None: ...

    def load_packages(self) -> PackagesRecord: ...

    def save_packages(self, record: PackagesRecord) -> None: ...


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new bytes, never a mix.

    The caller fsyncs the directory once after its last replace (see `fsync_directory`).
    """
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def fsync_directory(path: Path) -> None:
    """Make the renames inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileState:
    """State persisted under one directory per agent."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.config_dir = self.directory / CONFIG_DIR
        # The directory may come to hold private keys (certificate enrollment): only the
        # owner gets in when the agent creates it. An existing directory is left as it is.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config_dir.mkdir(parents=True, exist_ok=True)

    def load_instance_uid(self) -> bytes | None:
        path = self.directory / INSTANCE_UID_FILE
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise StateError(f"{path}: unreadable instance_uid: {error}") from error
        try:
            raw = uuid.UUID(text).bytes
        except ValueError:
            raise StateError(f"{path}: not a UUID: {text[:64]!r}") from None
        if problem := instance_uid_problem(raw):
            raise StateError(f"{path}: {problem}")
        return raw

    def save_instance_uid(self, instance_uid: bytes) -> None:
        text = f"{uuid.UUID(bytes=instance_uid)}\n"
        write_atomically(self.directory / INSTANCE_UID_FILE, text.encode("ascii"))
        fsync_directory(self.directory)

    def load_remote_config(self) -> RemoteConfigRecord:
        path = self.directory / REMOTE_CONFIG_FILE
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return RemoteConfigRecord()
        except (OSError, ValueError) as error:
            raise StateError(f"{path}: unreadable remote config record: {error}") from error
        try:
            content_types: dict[str, str] = document["files"]
            record = RemoteConfigRecord(
                last_hash=bytes.fromhex(document["last_remote_config_hash"]),
                status=_STATUS_VALUES[document["status"]],
                error_message=str(document["error_message"]),
                applied_hash=bytes.fromhex(document["applied_config_hash"]),
                files=self._read_config_files(content_types),
                signings=_parse_signings(document),
            )
        except (KeyError, TypeError, ValueError, AttributeError, ConfigRejected) as error:
            raise StateError(f"{path}: malformed remote config record: {error!r}") from error
        return record

    def _read_config_files(self, content_types: Mapping[str, str]) -> dict[str, ConfigFile]:
        # The effective config is what is on disk: a file deleted by hand is not reported.
        files = {}
        for name, content_type in content_types.items():
            try:
                body = (self.config_dir / disk_name(name)).read_bytes()
            except FileNotFoundError:
                continue
            files[name] = ConfigFile(body=body, content_type=str(content_type))
        return files

    def install_config(self, files: Mapping[str, ConfigFile]) -> None:
        wanted: set[str] = set()
        for name, file in files.items():
            # disk_name re-checks the name even though the agent checked the whole map:
            # nothing reaches the file system without passing it here.
            target = disk_name(name)
            wanted.add(target)
            write_atomically(self.config_dir / target, file.body)
        # The directory holds exactly the applied config: files of the previous config and
        # temporary files left by a crash go.
        for entry in self.config_dir.iterdir():
            if entry.name not in wanted and not entry.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        fsync_directory(self.config_dir)

    def save_remote_config(self, record: RemoteConfigRecord) -> None:
        status = _STATUS_NAMES.get(record.status)
        if status is None:
            raise ValueError(f"only terminal statuses are persisted, not {record.status}")
        document = {
            "last_remote_config_hash": record.last_hash.hex(),
            "status": status,
            "error_message": record.error_message,
            "applied_config_hash": record.applied_hash.hex(),
            "files": {name: file.content_type for name, file in sorted(record.files.items())},
            SIGNINGS_KEY: {
                name: {"sequence": signing.sequence, "config_hash": signing.config_hash}
                for name, signing in sorted(record.signings.items())
            },
        }
        data = json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        write_atomically(self.directory / REMOTE_CONFIG_FILE, data)
        fsync_directory(self.directory)

    def load_packages(self) -> PackagesRecord:
        path = self.directory / PACKAGES_FILE
        try:
            return PackagesRecord.from_json_bytes(path.read_bytes())
        except FileNotFoundError:
            return PackagesRecord()
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StateError(f"{path}: unreadable packages record: {error!r}") from error

    def save_packages(self, record: PackagesRecord) -> None:
        write_atomically(self.directory / PACKAGES_FILE, record.to_json_bytes())
        fsync_directory(self.directory)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _parse_signings(document: Mapping[str, object]) -> dict[str, AppliedSigning]:
    signings: dict[str, AppliedSigning] = {}
    # Records written before signing sequences kept the highest signed version applied;
    # those numbers are the sequences the server continued from, so they are read as
    # sequences without a hash. Absent from records written before signed configs existed.
    legacy = document.get(LEGACY_SIGNINGS_KEY, {})
    if not isinstance(legacy, dict):
        raise TypeError(f"{LEGACY_SIGNINGS_KEY} must be an object")
    for name, version in legacy.items():
        if not isinstance(name, str) or not _positive_int(version):
            raise ValueError(f"bad signed config version {name!r}: {version!r}")
        signings[name] = AppliedSigning(sequence=int(version))
    current = document.get(SIGNINGS_KEY, {})
    if not isinstance(current, dict):
        raise TypeError(f"{SIGNINGS_KEY} must be an object")
    for name, entry in current.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise ValueError(f"bad signed config entry {name!r}: {entry!r}")
        sequence, config_hash = entry.get("sequence"), entry.get("config_hash", "")
        if not _positive_int(sequence) or not isinstance(config_hash, str):
            raise ValueError(f"bad signed config entry {name!r}: {entry!r}")
        signings[name] = AppliedSigning(sequence=int(sequence), config_hash=config_hash)  # type: ignore[arg-type]
    return signings


class MemoryState:
    """State that lives as long as the process: for simulated agents."""

    def __init__(self) -> None:
        self.instance_uid: bytes | None = None
        self.remote_config = RemoteConfigRecord()
        self.installed: dict[str, ConfigFile] = {}
        self.packages = PackagesRecord()

    def load_instance_uid(self) -> bytes | None:
        return self.instance_uid

    def save_instance_uid(self, instance_uid: bytes) -> None:
        self.instance_uid = instance_uid

    def load_remote_config(self) -> RemoteConfigRecord:
        return self.remote_config

    def install_config(self, files: Mapping[str, ConfigFile]) -> None:
        self.installed = dict(files)

    def save_remote_config(self, record: RemoteConfigRecord) -> None:
        self.remote_config = record

    def load_packages(self) -> PackagesRecord:
        return self.packages

    def save_packages(self, record: PackagesRecord) -> None:
        self.packages = record
