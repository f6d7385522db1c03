"""Installing packages on disk: versioned directories, an atomic switch, a revert, removal.

`PackageStore` lays packages out under the agent's packages directory:

    <packages-dir>/<name>/<version>/<name>   the package file of each version kept
    <packages-dir>/<name>/current            a relative symlink to the version in use
    <packages-dir>/.downloads/               partial downloads (`agent_client.package_downloads`)

A switch writes a new symlink under a temporary name and renames it over `current`
(os.replace), so a reader sees the old or the new version, never neither. The version in
use and the one before it are kept; older ones go. `install_package` is the whole install
of a verified file: place it, switch, start-check it and switch back to the previous
version when the check fails. Two things can check a start: the start check of a
top-level package (`PackageSettings.start_check`, a command), and the package's runner
(`PackageRunner`, the agent's managed process) for the package it runs from, which is
restarted on the new version and must keep running through its start-check window; when
it does not, it is restarted on the version switched back to (or left stopped, with
none). `PackageSettings` is how an agent handles packages at all.

Names and versions become directory names, so only plain ones are accepted; versions
are immutable, so the installed version offered again with other content is refused.
Synchronous: the agent runs these in a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent_client.package_record import FailedPackage, InstalledPackage, PackagesRecord
from agent_client.state import fsync_directory

__all__ = [
    "CURRENT",
    "DOWNLOADS",
    "InstallRefused",
    "PackageRunner",
    "PackageSettings",
    "PackageStore",
    "StartCheck",
    "command_start_check",
    "install_package",
    "package_problem",
    "remove_package",
]

CURRENT = "current"
DOWNLOADS = ".downloads"
_TEMP_PREFIX = ".tmp-"
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$")
DEFAULT_MAX_PACKAGE_BYTES = 1 << 30

# name, version, the installed version's directory -> None when the package starts, else why not.
StartCheck = Callable[[str, str, Path], "str | None"]

VERSION_CONTENT_CHANGED = "version {version} is installed with other content (hash {installed}); versions are immutable"
START_FAILED = "start check failed: {reason}; {outcome}"


class PackageRunner(Protocol):
    """What runs a package from its `current` version (the agent's managed process).

    Called from the install's thread; each call returns once the process is started (or
    found not to start).
    """

    def runs(self, name: str) -> bool:
        """Whether it runs from package `name`."""
        ...

    def start_checked(self, name: str, version: str, path: Path) -> str | None:
        """Restart on `version` (just switched to, at `path`): None when it keeps running
        through the start-check window, else why not (it is then left stopped)."""
        ...

    def restart(self, name: str, version: str | None) -> None:
        """Restart on `version`, switched back to after a failed start check (None: no
        version is left, it stays stopped)."""
        ...


class InstallRefused(Exception):
    """An install the agent will not (or could not) do; the message is reported to the server."""


@dataclass(frozen=True)
class PackageSettings:
    """How an agent handles packages (declared as AcceptsPackages and ReportsPackageStatuses).

    `directory` None is a simulated agent's: files are downloaded and checked but nothing is
    written to disk, and the signature is checked only if the agent has trusted keys. With a
    directory every package must be signed by one of the agent's trusted keys.
    """

    directory: Path | None = None
    # Run after a top-level package was switched to; a failure switches back.
    start_check: StartCheck | None = None
    max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES
    connect_timeout: float = 10.0
    # Seconds without a byte before a download is given up (and resumed on the next attempt).
    read_timeout: float = 30.0
    download_attempts: int = 3
    retry_delay: float = 1.0
    # Seconds between two Downloading reports of one package.
    progress_interval: float = 1.0
    # PEM bundle for https download URLs (default: httpx's trust store).
    ca_file: Path | None = None
    # Drill: every install fails after its download (reported InstallFailed).
    fail_install: bool = False
    # Simulation: False skips the download itself (nothing is fetched or checked).
    download: bool = True

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if self.download_attempts < 1:
            raise ValueError("download_attempts must be at least 1")
        for name in ("connect_timeout", "read_timeout", "progress_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.retry_delay < 0:
            raise ValueError("retry_delay must not be negative")


def package_problem(name: str, version: str) -> str | None:
    """Why `name` / `version` cannot be installed here (they become directory names), or None."""
    if not _PLAIN.match(name):
        return f"package name {name[:80]!r} is not a plain name (letters, digits, . _ + ~ -; 1-128 characters)"
    if not _PLAIN.match(version) or version == CURRENT:
        return f"package version {version[:80]!r} is not a plain name (letters, digits, . _ + ~ -; 1-128 characters)"
    return None


def command_start_check(argv: Sequence[str], *, timeout: float = 60.0) -> StartCheck:
    """A start check running `argv` (`{name}`, `{version}` and `{path}` replaced); exit 0 passes."""
    if not argv:
        raise ValueError("the start check command is empty")

    def check(name: str, version: str, path: Path) -> str | None:
        command = [part.format(name=name, version=version, path=str(path)) for part in argv]
        try:
            result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            return str(error)
        if result.returncode == 0:
            return None
        detail = result.stderr.decode("utf-8", "replace").strip()[-200:]
        return f"{argv[0]} exited with status {result.returncode}" + (f": {detail}" if detail else "")

    return check


class PackageStore:
    """The packages directory (see the module's docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.downloads = self.root / DOWNLOADS
        self.downloads.mkdir(mode=0o700, parents=True, exist_ok=True)

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def current(self, name: str) -> Path:
        return self.root / name / CURRENT

    def current_version(self, name: str) -> str | None:
        try:
            return os.readlink(self.current(name))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def versions(self, name: str) -> set[str]:
        directory = self.root / name
        if not directory.is_dir():
            return set()
        return {
            entry.name
            for entry in directory.iterdir()
            if entry.name != CURRENT and not entry.name.startswith(_TEMP_PREFIX) and entry.is_dir()
        }

    def partial_path(self, name: str, content_hash: bytes) -> Path:
        """Where a download of these bytes is kept until it is complete and checked."""
        return self.downloads / f"{name}-{content_hash.hex()[:32]}.part"

    def place(self, name: str, version: str, file: Path, *, executable: bool) -> Path:
        """Move `file` to `<name>/<version>/<name>` (a version already there is replaced)."""
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=_TEMP_PREFIX))
        try:
            target = staging / name
            shutil.move(file, target)
            target.chmod(0o755 if executable else 0o644)
            final = self.version_dir(name, version)
            if final.exists():
                # A crash between a switch and its record leaves the version on disk; it is
                # placed afresh. Renamed aside first: a directory cannot be replaced in place.
                aside = directory / f"{_TEMP_PREFIX}old-{secrets.token_hex(4)}"
                os.replace(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(directory)
        return final

    def switch(self, name: str, version: str) -> None:
        """Point `current` at `version`, atomically."""
        directory = self.root / name
        temp = directory / f"{_TEMP_PREFIX}current-{secrets.token_hex(4)}"
        os.symlink(version, temp)
        try:
            os.replace(temp, self.current(name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        fsync_directory(directory)

    def unset_current(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.current(name))

    def prune(self, name: str, keep: Collection[str]) -> None:
        """Remove the versions of `name` not in `keep`, and temporary leftovers."""
        directory = self.root / name
        for entry in directory.iterdir():
            if entry.name == CURRENT or entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def remove(self, name: str) -> None:
        """Remove the package and every version of it."""
        shutil.rmtree(self.root / name, ignore_errors=True)

    def clean_downloads(self, keep: Collection[Path]) -> None:
        """Remove partial downloads no offered package will resume."""
        for entry in self.downloads.iterdir():
            if entry not in keep:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def install_package(
    store: PackageStore,
    record: PackagesRecord,
    *,
    name: str,
    version: str,
    package_hash: bytes,
    top_level: bool,
    file: Path,
    start_check: StartCheck | None,
    runner: PackageRunner | None = None,
) -> PackagesRecord:
    """Install the verified `file` as `name` `version` and switch to it; the record after.

    A top-level package is start-checked by `start_check`, then a package `runner` runs
    from by the runner (restarted on it). When either fails, the package is switched back
    to the version before (or, with none, left without a current version), the runner is
    restarted on that version if it was started on the new one, the failed version is
    removed, and the record says InstallFailed with the reason. Raises InstallRefused when
    nothing was changed (a version offered again with other content), OSError when the disk
    fails.
    """
    previous = record.installed.get(name)
    if previous is not None and previous.version == version:
        if previous.hash != package_hash:
            raise InstallRefused(VERSION_CONTENT_CHANGED.format(version=version, installed=previous.hash.hex()[:16]))
        return record.with_installed(name, previous)  # already installed: nothing to do
    before = previous.version if previous is not None else None
    store.place(name, version, file, executable=top_level)
    store.switch(name, version)
    path = store.version_dir(name, version)
    reason = _start_checked(start_check, name, version, path) if top_level and start_check is not None else None
    # Restarted on the new version only when the command check passed; then also on the old.
    restarted = runner if runner is not None and reason is None and runner.runs(name) else None
    if restarted is not None:
        reason = _start_checked(restarted.start_checked, name, version, path)
    if reason is not None:
        if before:
            store.switch(name, before)
            outcome = f"reverted to {before}"
        else:
            store.unset_current(name)
            outcome = "no previous version to revert to"
        store.prune(name, keep={before} if before else set())
        if restarted is not None:
            try:
                restarted.restart(name, before)
            except Exception as error:  # the record must still say what happened on disk
                outcome += f"; restarting on it failed: {type(error).__name__}: {error}"
        failure = FailedPackage(version, package_hash, START_FAILED.format(reason=reason, outcome=outcome))
        return record.with_failed(name, failure)
    store.prune(name, keep={version, before} if before else {version})
    return record.with_installed(
        name, InstalledPackage(version=version, hash=package_hash, top_level=top_level, previous_version=before or "")
    )


def _start_checked(check: StartCheck, name: str, version: str, path: Path) -> str | None:
    try:
        return check(name, version, path)
    except Exception as error:  # a check that crashes is a check that failed
        return f"{type(error).__name__}: {error}"


def remove_package(store: PackageStore | None, record: PackagesRecord, name: str) -> PackagesRecord:
    """Remove a package the server installed (and its directory); the record after."""
    if store is not None and name in record.installed:
        store.remove(name)
    return record.without(name)
