"""The agent's handling of package offers (`packages_available`) and its package statuses.

An agent given `AgentSettings.packages` declares AcceptsPackages and ReportsPackageStatuses.
An offer whose `all_packages_hash` is the one the agent last finished processing changes
nothing. Any other offer starts a background task (heartbeats go on meanwhile; a newer
offer cancels it and starts over, downloads resuming where they stopped) that, for each
offered package whose hash differs from the installed one: downloads the file
(`agent_client.package_downloads`), checks the SHA-256 of its bytes against
`file.content_hash` and its signature against the agent's trusted keys
(`opamp.package_signature.verify_package_file`), and only then installs it
(`agent_client.packages.install_package`; a managed process that runs from the package is
restarted on the new version and is its start check, `agent_client.agent_managed`).
Packages the server installed and no longer offers are removed. Every step is reported in
`package_statuses`: InstallPending, Downloading (with percent and bytes per second),
Installing, then Installed or InstallFailed with the reason; `server_provided_all_packages_hash` becomes the offer's
once it is processed. The record (`agent_client.package_record`) is saved after each
package, so a restarted agent reports what it has and downloads nothing again.

The task belongs to the session: a session that ends cancels it (an install under way
finishes first), and the server offers the packages again on the next one because the
agent still reports the previous `server_provided_all_packages_hash`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx

from agent_client.agent_base import AgentBase
from agent_client.package_downloads import Downloaded, DownloadFailed, DownloadProgress, download_file
from agent_client.package_record import FailedPackage, InstalledPackage, PackagesRecord
from agent_client.packages import (
    InstallRefused,
    PackageSettings,
    PackageStore,
    install_package,
    package_problem,
    remove_package,
)
from agent_client.transport import TransportError
from opamp.config_signature import SignatureError
from opamp.package_signature import verify_package_file
from opamp.proto import opamp_pb2 as pb

NO_CONTENT_HASH = "the offer carries no content hash for the file"
HASH_MISMATCH = "the file hashes to {actual}, not to the offered content hash {offered}"
NO_TRUSTED_KEYS = "no trusted keys: the package signature cannot be checked"
DRILL_FAILURE = "drill: install failure"


class PackageHandling(AgentBase):
    """Packages for `agent_client.agent.Agent`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        packages = self.settings.packages
        self._packages_record = self._state.load_packages() if packages is not None else PackagesRecord()
        self._package_store = (
            PackageStore(packages.directory) if packages is not None and packages.directory is not None else None
        )
        self._package_statuses: dict[str, pb.PackageStatus] = statuses_from_record(self._packages_record)
        self._packages_task: asyncio.Task[None] | None = None
        self._packages_offer_hash = b""  # the offer the task is processing
        self._packages_error = ""  # why the last offer could not be processed at all
        # Package bytes fetched over the network by this agent (a simulated fleet's throughput).
        self.package_bytes_downloaded = 0

    @property
    def packages(self) -> PackagesRecord:
        """What the server installed and what failed, as of the last package finished."""
        return self._packages_record

    @property
    def package_statuses(self) -> dict[str, pb.PackageStatus]:
        """The statuses the agent reports now, by package name."""
        return dict(self._package_statuses)

    def _package_statuses_report(self) -> pb.PackageStatuses | None:
        if self.settings.packages is None:
            return None
        message = pb.PackageStatuses(
            server_provided_all_packages_hash=self._packages_record.all_packages_hash,
            error_message=self._packages_error,
        )
        for name, status in sorted(self._package_statuses.items()):
            message.packages[name].CopyFrom(status)
        return message

    # -- offers --------------------------------------------------------------------------

    async def _on_packages_available(self, offer: pb.PackagesAvailable) -> None:
        if self.settings.packages is None:
            self._log.warning("ignoring a packages offer: AcceptsPackages is not declared")
            return
        offered = offer.all_packages_hash
        task = self._packages_task
        if task is not None and not task.done():
            if offered == self._packages_offer_hash:
                return  # the offer under way, repeated
            self._log.info("a new packages offer supersedes the one under way")
            await self._stop_package_work()
        elif offered == self._packages_record.all_packages_hash:
            return
        self._packages_offer_hash = offered
        self._packages_task = asyncio.create_task(self._offer_task(offer), name=f"packages {offered.hex()[:8]}")

    async def _stop_package_work(self) -> None:
        """Cancel the offer under way (an install in progress finishes first)."""
        task, self._packages_task = self._packages_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # What is reported falls back to what the record says.
        self._package_statuses = statuses_from_record(self._packages_record)

    async def _offer_task(self, offer: pb.PackagesAvailable) -> None:
        self._packages_error = ""
        try:
            await self._process_offer(offer)
        except Exception as error:
            # Not recorded as processed: the server offers it again on the next session.
            self._log.exception("processing the packages offer failed")
            self._packages_error = f"processing the offer failed: {type(error).__name__}: {error}"
            self._package_statuses = statuses_from_record(self._packages_record)
            await self._report_packages()

    async def _process_offer(self, offer: pb.PackagesAvailable) -> None:
        settings = self.settings.packages
        assert settings is not None
        record = self._packages_record
        retried = {name for name, package in offer.packages.items() if _needs_install(record, name, package)}
        if any(name not in retried for name in record.failed):
            # A failure of a package no longer offered, or offered at the version installed, is history.
            failed = {name: failure for name, failure in record.failed.items() if name in retried}
            record = PackagesRecord(record.all_packages_hash, record.installed, failed)
            await self._commit(record)
        work: list[tuple[str, pb.PackageAvailable]] = []
        statuses: dict[str, pb.PackageStatus] = {}
        for name, package in sorted(offer.packages.items()):
            installed = record.installed.get(name)
            if installed is not None and name not in retried:
                statuses[name] = installed_status(name, installed)
            else:
                work.append((name, package))
                statuses[name] = offered_status(name, installed, package, pb.PackageStatusEnum_InstallPending)
        gone = sorted(name for name in record.installed if name not in offer.packages)
        for name in gone:
            statuses[name] = installed_status(name, record.installed[name])
        self._package_statuses = statuses
        self._log.info(
            "packages offer %s: %d to install, %d to remove", offer.all_packages_hash.hex()[:16], len(work), len(gone)
        )
        await self._report_packages()

        store = self._package_store
        if store is not None:
            keep = {
                store.partial_path(name, package.file.content_hash)
                for name, package in work
                if not package_problem(name, package.version)
            }
            keep |= {path.with_name(path.name + ".validator") for path in keep}
            await asyncio.to_thread(store.clean_downloads, keep)
        async with self._download_client(settings) as client:
            for name, package in work:
                await self._install_offered(client, settings, name, package)
        for name in gone:
            await self._commit(await asyncio.to_thread(remove_package, store, self._packages_record, name))
            self._package_statuses.pop(name, None)
            self._log.info("package %s removed: no longer offered", name)
        await self._commit(self._packages_record.processed(offer.all_packages_hash))
        await self._report_packages()

    @staticmethod
    def _download_client(settings: PackageSettings) -> httpx.AsyncClient:
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        verify: Any = str(settings.ca_file) if settings.ca_file is not None else True
        return httpx.AsyncClient(timeout=timeout, verify=verify, trust_env=False, follow_redirects=True)

    async def _install_offered(
        self, client: httpx.AsyncClient, settings: PackageSettings, name: str, package: pb.PackageAvailable
    ) -> None:
        installed = self._packages_record.installed.get(name)
        version, package_hash = package.version, offered_hash(package)
        store = self._package_store
        problem = package_problem(name, version)
        # The name is part of the partial file's name: only a plain one gets near the disk.
        partial = store.partial_path(name, package.file.content_hash) if store is not None and not problem else None

        async def progress(update: DownloadProgress) -> None:
            status = offered_status(name, installed, package, pb.PackageStatusEnum_Downloading)
            status.download_details.download_percent = update.percent
            status.download_details.download_bytes_per_second = update.bytes_per_second
            self._package_statuses[name] = status
            await self._report_packages()

        try:
            if problem:
                raise InstallRefused(problem)
            if not package.file.content_hash:
                raise InstallRefused(NO_CONTENT_HASH)
            if settings.download:
                downloaded = await download_file(
                    client,
                    url=package.file.download_url,
                    headers={header.key: header.value for header in package.file.headers.headers},
                    partial=partial,
                    max_bytes=settings.max_bytes,
                    attempts=settings.download_attempts,
                    retry_delay=settings.retry_delay,
                    on_progress=progress,
                    progress_interval=settings.progress_interval,
                )
                self.package_bytes_downloaded += downloaded.fetched
                self._check_file(name, package, downloaded)
            else:
                await progress(DownloadProgress(received=0, total=None, bytes_per_second=0.0))
                downloaded = None
            self._package_statuses[name] = offered_status(name, installed, package, pb.PackageStatusEnum_Installing)
            await self._report_packages()
            if settings.fail_install:
                raise InstallRefused(DRILL_FAILURE)
            if store is None or downloaded is None or downloaded.path is None:
                installed_now = InstalledPackage(version, package_hash, _top_level(package))
                record = self._packages_record.with_installed(name, installed_now)
            else:
                record = await self._install_in_thread(store, name, package, downloaded.path, settings)
        except (DownloadFailed, InstallRefused, OSError) as error:
            reason = str(error) or type(error).__name__
            record = self._packages_record.with_failed(name, FailedPackage(version, package_hash, reason))
            resumable = isinstance(error, DownloadFailed) and error.resumable
        else:
            resumable = False
        if partial is not None and not resumable:
            # Installed bytes were moved; refused bytes are never resumed. A download the
            # network cut is, by the next offer.
            await asyncio.to_thread(_remove_partial, partial)
        await self._commit(record)
        failure = record.failed.get(name)
        if failure is not None and failure.version == version and failure.hash == package_hash:
            self._log.warning("package %s %s failed: %s", name, version, failure.error_message)
            status = offered_status(name, record.installed.get(name), package, pb.PackageStatusEnum_InstallFailed)
            status.error_message = failure.error_message
        else:
            self._log.info("package %s %s installed", name, version)
            status = installed_status(name, record.installed[name])
        self._package_statuses[name] = status
        await self._report_packages()

    def _check_file(self, name: str, package: pb.PackageAvailable, downloaded: Downloaded) -> None:
        """Raise InstallRefused unless the bytes are the offered ones and signed by a trusted key."""
        expected = package.file.content_hash
        if downloaded.sha256 != expected:
            raise InstallRefused(HASH_MISMATCH.format(actual=downloaded.sha256.hex(), offered=expected.hex()))
        trusted_keys = self.settings.trusted_keys
        if trusted_keys is None:
            if self._package_store is not None:
                raise InstallRefused(NO_TRUSTED_KEYS)
            return  # a simulated agent without keys checks the hash only
        try:
            verify_package_file(
                package.file.signature,
                package=name,
                version=package.version,
                content_sha256=downloaded.sha256.hex(),
                trusted_keys=trusted_keys,
            )
        except SignatureError as error:
            raise InstallRefused(error.message) from None

    async def _install_in_thread(
        self, store: PackageStore, name: str, package: pb.PackageAvailable, file: Path, settings: PackageSettings
    ) -> PackagesRecord:
        work = asyncio.ensure_future(
            asyncio.to_thread(
                install_package,
                store,
                self._packages_record,
                name=name,
                version=package.version,
                package_hash=offered_hash(package),
                top_level=_top_level(package),
                file=file,
                start_check=settings.start_check,
                runner=self._package_runner(),
            )
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The disk changes either way: let the install finish and record it, then stop.
            with contextlib.suppress(Exception):
                await self._commit(await work)
            raise

    async def _commit(self, record: PackagesRecord) -> None:
        self._packages_record = record
        try:
            await asyncio.to_thread(self._state.save_packages, record)
        except OSError as error:
            self._log.error("could not persist the packages record: %s", error)

    async def _report_packages(self) -> None:
        if not self.connected:
            return  # the next session opens with a full report, statuses included
        try:
            await self._send_report(package_statuses=True)
        except TransportError as error:
            # The session notices the broken transport itself and ends; nothing to add here.
            self._log.debug("package status not sent: %s", error)


def offered_hash(package: pb.PackageAvailable) -> bytes:
    """The package's hash as the server offers it (its file's content hash when unset)."""
    return package.hash or package.file.content_hash


def _needs_install(record: PackagesRecord, name: str, package: pb.PackageAvailable) -> bool:
    installed = record.installed.get(name)
    return installed is None or installed.hash != offered_hash(package)


def _top_level(package: pb.PackageAvailable) -> bool:
    return package.type == pb.PackageType_TopLevel


def _remove_partial(partial: Path) -> None:
    for path in (partial, partial.with_name(partial.name + ".validator")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def installed_status(name: str, installed: InstalledPackage) -> pb.PackageStatus:
    """Installed by the server: what the agent has is what the server offered."""
    return pb.PackageStatus(
        name=name,
        agent_has_version=installed.version,
        agent_has_hash=installed.hash,
        server_offered_version=installed.version,
        server_offered_hash=installed.hash,
        status=pb.PackageStatusEnum_Installed,
    )


def offered_status(
    name: str, installed: InstalledPackage | None, package: pb.PackageAvailable, status: pb.PackageStatusEnum
) -> pb.PackageStatus:
    """A status of an offered package not (yet) installed: the agent_has fields stay empty
    unless another version of it is installed, as the specification asks."""
    return pb.PackageStatus(
        name=name,
        agent_has_version=installed.version if installed is not None else "",
        agent_has_hash=installed.hash if installed is not None else b"",
        server_offered_version=package.version,
        server_offered_hash=offered_hash(package),
        status=status,
    )


def statuses_from_record(record: PackagesRecord) -> dict[str, pb.PackageStatus]:
    """What a (re)started agent reports before any offer: installed packages, failed installs."""
    statuses = {name: installed_status(name, installed) for name, installed in record.installed.items()}
    for name, failure in record.failed.items():
        installed = record.installed.get(name)
        statuses[name] = pb.PackageStatus(
            name=name,
            agent_has_version=installed.version if installed is not None else "",
            agent_has_hash=installed.hash if installed is not None else b"",
            server_offered_version=failure.version,
            server_offered_hash=failure.hash,
            status=pb.PackageStatusEnum_InstallFailed,
            error_message=failure.error_message,
        )
    return statuses
