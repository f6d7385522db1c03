"""Package offers end to end on the agent's side: a fake OpAMP server offers, a local file server serves."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_client import Agent, AgentSettings, Fleet
from agent_client.packages import PackageSettings
from agent_client.signed_config import trusted_keys_by_id
from agent_client.simulator import package_counts, progress_line, with_packages
from agent_client.testing import FakeWebSocketServer
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.file_server import FileServer
from tests.agent_client.helpers import (
    FAST,
    HEARTBEAT_FIELDS,
    QUIET,
    field_names,
    full_state_request,
    is_full_report,
    make_agent,
    running,
)
from tests.agent_client.package_offers import (
    DOWNLOADING,
    FAILED,
    INSTALLED,
    INSTALLING,
    PENDING,
    Offered,
    has_statuses,
    offer,
    until_processed,
)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest_asyncio.fixture
async def files() -> AsyncIterator[FileServer]:
    async with FileServer() as server:
        yield server


@pytest.fixture
def settings(key: Ed25519PrivateKey, tmp_path: Path) -> AgentSettings:
    packages = PackageSettings(directory=tmp_path / "packages", progress_interval=0.001, retry_delay=0.0)
    return replace(QUIET, trusted_keys=trusted_keys_by_id([key.public_key()]), packages=packages)


def steps(reports: list[pb.PackageStatuses], name: str) -> list[int]:
    """The statuses `name` went through, repeats folded."""
    seen: list[int] = []
    for report in reports:
        if name in report.packages and (not seen or seen[-1] != report.packages[name].status):
            seen.append(report.packages[name].status)
    return seen


async def deliver(server: FakeWebSocketServer, available: pb.PackagesAvailable) -> list[pb.PackageStatuses]:
    await server.push(pb.ServerToAgent(packages_available=available))
    return await until_processed(server, available)


async def connected(server: FakeWebSocketServer) -> pb.AgentToServer:
    return await server.next_matching(is_full_report)


async def test_an_offer_is_downloaded_verified_installed_and_reported_step_by_step(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    body = os.urandom(50_000)
    available = offer(files, key, Offered("otelcol", "2.0.0", body))
    agent = make_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        first = await connected(ws_server)
        reports = await deliver(ws_server, available)

    assert first.capabilities & AgentCapabilities.ACCEPTS_PACKAGES
    assert first.capabilities & AgentCapabilities.REPORTS_PACKAGE_STATUSES
    assert first.package_statuses == pb.PackageStatuses()
    assert steps(reports, "otelcol") == [PENDING, DOWNLOADING, INSTALLING, INSTALLED]
    downloading = [r.packages["otelcol"] for r in reports if r.packages["otelcol"].status == DOWNLOADING]
    assert downloading[-1].download_details.download_percent == 100.0
    assert downloading[-1].download_details.download_bytes_per_second > 0
    # Until processed the agent reports the hash it had; then the offer's.
    assert {r.server_provided_all_packages_hash for r in reports[:-1]} == {b""}
    final = reports[-1].packages["otelcol"]
    package = available.packages["otelcol"]
    assert (final.agent_has_version, final.agent_has_hash) == ("2.0.0", package.hash)
    assert (final.server_offered_version, final.server_offered_hash) == ("2.0.0", package.hash)
    assert final.error_message == ""
    pending = reports[0].packages["otelcol"]
    assert (pending.agent_has_version, pending.agent_has_hash) == ("", b"")
    assert (pending.server_offered_version, pending.server_offered_hash) == ("2.0.0", package.hash)
    packages_dir = settings.packages.directory
    assert (packages_dir / "otelcol" / "current" / "otelcol").read_bytes() == body
    assert list((packages_dir / ".downloads").iterdir()) == []
    assert files.requests_for("/packages/otelcol/2.0.0")[0]["authorization"] == "Bearer download-token"


async def test_a_download_cut_half_way_resumes_and_installs_the_exact_bytes(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    body = os.urandom(200_000)
    available = offer(files, key, Offered("otelcol", "2.0.0", body))
    files.cut_next(100_000)
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        reports = await deliver(ws_server, available)

    assert reports[-1].packages["otelcol"].status == INSTALLED
    requests = files.requests_for("/packages/otelcol/2.0.0")
    assert [request.get("range") for request in requests] == [None, "bytes=100000-"]
    assert (settings.packages.directory / "otelcol" / "2.0.0" / "otelcol").read_bytes() == body


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda p, other: replace(p, content_hash=hashlib.sha256(b"other").digest()),
            "not to the offered content hash",
        ),
        (lambda p, other: replace(p, signed_body=b"other bytes"), "does not match its signature"),
        (lambda p, other: replace(p, signer=other), "which this agent does not trust"),
    ],
    ids=["wrong hash", "bad signature", "untrusted key"],
)
async def test_a_refused_file_is_reported_failed_and_nothing_is_installed(
    ws_server: FakeWebSocketServer,
    files: FileServer,
    settings: AgentSettings,
    key,
    state_dir: Path,
    tamper: Callable[[Offered, Ed25519PrivateKey], Offered],
    reason: str,
) -> None:
    package = tamper(Offered("otelcol", "2.0.0", os.urandom(10_000)), Ed25519PrivateKey.generate())
    available = offer(files, key, package)
    agent = make_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        await connected(ws_server)
        reports = await deliver(ws_server, available)

    status = reports[-1].packages["otelcol"]
    assert steps(reports, "otelcol") == [PENDING, DOWNLOADING, FAILED]
    assert reason in status.error_message
    assert (status.agent_has_version, status.agent_has_hash) == ("", b"")
    assert (status.server_offered_version, status.server_offered_hash) == ("2.0.0", available.packages["otelcol"].hash)
    packages_dir = settings.packages.directory
    assert not (packages_dir / "otelcol").exists()
    assert list((packages_dir / ".downloads").iterdir()) == []  # refused bytes are not kept to resume
    assert agent.packages.installed == {}


async def test_without_trusted_keys_nothing_is_installed(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    available = offer(files, key, Offered("otelcol", "2.0.0", b"binary"))
    async with running(make_agent(ws_server.url, state_dir, replace(settings, trusted_keys=None))):
        await connected(ws_server)
        reports = await deliver(ws_server, available)
    assert reports[-1].packages["otelcol"].error_message == "no trusted keys: the package signature cannot be checked"
    assert not (settings.packages.directory / "otelcol").exists()


async def test_a_failed_start_check_keeps_the_previous_version_and_reports_failed(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    settings = replace(
        settings,
        packages=replace(
            settings.packages, start_check=lambda name, version, path: "crashed" if version == "2" else None
        ),
    )
    v1 = offer(files, key, Offered("otelcol", "1", b"one"))
    v2 = offer(files, key, Offered("otelcol", "2", b"two"))
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        await deliver(ws_server, v1)
        reports = await deliver(ws_server, v2)

    status = reports[-1].packages["otelcol"]
    assert status.status == FAILED
    assert status.error_message == "start check failed: crashed; reverted to 1"
    assert (status.agent_has_version, status.server_offered_version) == ("1", "2")
    assert (settings.packages.directory / "otelcol" / "current" / "otelcol").read_bytes() == b"one"


async def test_a_restarted_agent_reports_its_packages_and_downloads_nothing_again(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    available = offer(files, key, Offered("otelcol", "2.0.0", b"binary"))
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        await deliver(ws_server, available)
    downloads = len(files.requests)

    restarted = make_agent(ws_server.url, state_dir, settings)
    async with running(restarted):
        report = (await connected(ws_server)).package_statuses
        await ws_server.push(pb.ServerToAgent(packages_available=available))  # the same offer again
        await ws_server.push(full_state_request())
        again = await connected(ws_server)

    assert report.server_provided_all_packages_hash == available.all_packages_hash
    assert report.packages["otelcol"].status == INSTALLED
    assert report.packages["otelcol"].agent_has_version == "2.0.0"
    assert again.package_statuses == report
    assert len(files.requests) == downloads


async def test_packages_no_longer_offered_are_removed(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    both = offer(files, key, Offered("otelcol", "1", b"one"), Offered("addon", "1", b"add"))
    only_one = offer(files, key, Offered("otelcol", "1", b"one"))
    async with running(make_agent(ws_server.url, state_dir, settings)) as _:
        await connected(ws_server)
        first = await deliver(ws_server, both)
        requests = len(files.requests)
        reports = await deliver(ws_server, only_one)

    assert set(first[-1].packages) == {"otelcol", "addon"}
    assert set(reports[-1].packages) == {"otelcol"}
    assert not (settings.packages.directory / "addon").exists()
    assert (settings.packages.directory / "otelcol" / "current").exists()
    assert len(files.requests) == requests  # the package kept is not downloaded again


async def test_a_new_offer_mid_download_supersedes_it_and_heartbeats_go_on(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    settings = replace(settings, heartbeat_interval=FAST.heartbeat_interval)
    v2 = offer(files, key, Offered("otelcol", "2", os.urandom(100_000)))
    v3 = offer(files, key, Offered("otelcol", "3", b"three"))
    agent = make_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        await connected(ws_server)
        files.hold_next()
        await ws_server.push(pb.ServerToAgent(packages_available=v2))
        await files.holding.wait()
        # The download is held: heartbeats still go out meanwhile.
        since = len(ws_server.messages)
        async with asyncio.timeout(2):
            while not any(field_names(m) == HEARTBEAT_FIELDS for m in ws_server.messages[since:]):
                await asyncio.sleep(0.01)
        assert files.holding.is_set() and agent.package_statuses["otelcol"].status == DOWNLOADING
        reports = await deliver(ws_server, v3)
        files.release()

    assert reports[-1].packages["otelcol"].status == INSTALLED
    assert reports[-1].packages["otelcol"].agent_has_version == "3"
    assert agent.packages.installed["otelcol"].version == "3"
    assert (settings.packages.directory / "otelcol" / "current" / "otelcol").read_bytes() == b"three"
    assert not (settings.packages.directory / "otelcol" / "2").exists()


async def test_an_agent_without_package_settings_ignores_offers(
    ws_server: FakeWebSocketServer, files: FileServer, key, state_dir: Path
) -> None:
    agent = make_agent(ws_server.url, state_dir, QUIET)
    async with running(agent):
        first = await connected(ws_server)
        await ws_server.push(pb.ServerToAgent(packages_available=offer(files, key, Offered("otelcol", "1", b"x"))))
        await ws_server.push(full_state_request())
        again = await connected(ws_server)
    assert not first.capabilities & AgentCapabilities.ACCEPTS_PACKAGES
    assert not again.HasField("package_statuses")
    assert files.requests == []


async def test_a_simulated_fleet_downloads_for_real_and_a_share_fails_the_install(
    ws_server: FakeWebSocketServer, files: FileServer, key
) -> None:
    available = offer(files, key, Offered("otelcol", "2", os.urandom(20_000)))
    ws_server.responder = lambda message: pb.ServerToAgent(
        instance_uid=message.instance_uid, packages_available=available
    )
    packages = PackageSettings(progress_interval=0.001)
    fleet = Fleet(
        server=ws_server.url,
        count=4,
        settings_for=with_packages(lambda index: QUIET, count=4, packages=packages, fail_fraction=0.5),
    )
    async with fleet:
        assert await fleet.wait_connected(timeout=3)
        for agent in fleet.agents:
            await until_agent(agent, lambda a: a.packages.all_packages_hash == available.all_packages_hash)
        counts = package_counts(fleet)

    assert counts == {"installed": 2, "failed": 2}
    assert all(agent.package_bytes_downloaded == 20_000 for agent in fleet.agents)
    assert "packages failed 2, installed 2 | 0.1 MB downloaded" in progress_line(fleet)
    failed = [a for a in fleet.agents if a.package_statuses["otelcol"].status == FAILED]
    assert {a.package_statuses["otelcol"].error_message for a in failed} == {"drill: install failure"}
    assert len(files.requests_for("/packages/otelcol/2")) == 4  # every agent downloaded the file


async def test_simulated_agents_can_skip_the_download(ws_server: FakeWebSocketServer, files: FileServer, key) -> None:
    available = offer(files, key, Offered("otelcol", "2", b"binary"))
    ws_server.responder = lambda message: pb.ServerToAgent(
        instance_uid=message.instance_uid, packages_available=available
    )
    skipping = with_packages(lambda i: QUIET, count=2, packages=PackageSettings(), skip_download_fraction=1.0)
    async with Fleet(server=ws_server.url, count=2, settings_for=skipping) as fleet:
        for agent in fleet.agents:
            await until_agent(agent, lambda a: a.packages.all_packages_hash == available.all_packages_hash)
    assert all(agent.packages.installed["otelcol"].version == "2" for agent in fleet.agents)
    assert files.requests == []


async def until_agent(agent: Agent, condition: Callable[[Agent], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition(agent):
            await asyncio.sleep(0.01)


async def test_an_offer_that_cannot_be_processed_at_all_is_reported_with_the_reason(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    available = offer(files, key, Offered("otelcol", "2", b"binary"))
    agent = make_agent(ws_server.url, state_dir, settings)
    downloads = settings.packages.directory / ".downloads"
    downloads.rmdir()
    downloads.write_bytes(b"not a directory")
    async with running(agent):
        await connected(ws_server)
        await ws_server.push(pb.ServerToAgent(packages_available=available))
        report = await ws_server.next_matching(lambda m: has_statuses(m) and m.package_statuses.error_message != "")

    assert report.package_statuses.error_message.startswith("processing the offer failed: NotADirectoryError")
    assert report.package_statuses.server_provided_all_packages_hash == b""  # not processed: offered again
    assert agent.packages.installed == {}


async def test_a_download_the_network_keeps_cutting_fails_and_the_next_offer_resumes_it(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    body = os.urandom(90_000)
    first = offer(files, key, Offered("otelcol", "2", body))
    later = offer(files, key, Offered("otelcol", "2", body), Offered("addon", "1", b"add"))
    for cut in (10_000, 20_000, 30_000):  # each attempt gets a little further
        files.cut_next(cut)
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        failed = (await deliver(ws_server, first))[-1].packages["otelcol"]
        kept = sorted(path.name for path in (settings.packages.directory / ".downloads").iterdir())
        installed = (await deliver(ws_server, later))[-1].packages["otelcol"]

    assert failed.status == FAILED
    assert "after 3 attempts" in failed.error_message
    assert len(kept) == 2  # the partial file and its validator
    ranges = [request.get("range") for request in files.requests_for("/packages/otelcol/2")]
    assert ranges == [None, "bytes=10000-", "bytes=30000-", "bytes=60000-"]
    assert installed.status == INSTALLED
    assert (settings.packages.directory / "otelcol" / "current" / "otelcol").read_bytes() == body


async def test_an_offer_without_a_content_hash_is_refused_without_downloading(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    available = offer(files, key, Offered("otelcol", "2", b"binary"))
    available.packages["otelcol"].file.content_hash = b""
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        reports = await deliver(ws_server, available)
    assert reports[-1].packages["otelcol"].error_message == "the offer carries no content hash for the file"
    assert files.requests == []


async def test_a_package_name_that_is_not_plain_is_refused_without_touching_the_disk(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path, tmp_path: Path
) -> None:
    available = offer(files, key, Offered("../../outside", "1", b"binary"))
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        reports = await deliver(ws_server, available)
    assert "is not a plain name" in reports[-1].packages["../../outside"].error_message
    assert files.requests == []
    assert sorted(path.name for path in settings.packages.directory.iterdir()) == [".downloads"]
    assert not (tmp_path / "outside").exists()


async def test_a_download_interrupted_by_a_stop_is_resumed_by_the_restarted_agent(
    ws_server: FakeWebSocketServer, files: FileServer, settings: AgentSettings, key, state_dir: Path
) -> None:
    body = os.urandom(100_000)
    available = offer(files, key, Offered("otelcol", "2", body))
    files.hold_next()
    async with running(make_agent(ws_server.url, state_dir, settings)):
        await connected(ws_server)
        await ws_server.push(pb.ServerToAgent(packages_available=available))
        await files.holding.wait()
        # Stopped once the first bytes are on disk.
        await ws_server.next_matching(lambda m: has_statuses(m) and downloaded_some(m.package_statuses))
    files.release()

    restarted = make_agent(ws_server.url, state_dir, settings)
    async with running(restarted):
        first = await connected(ws_server)
        reports = await deliver(ws_server, available)

    assert first.package_statuses.packages == {}  # nothing installed, nothing reported
    assert first.package_statuses.server_provided_all_packages_hash == b""  # so the server offers again
    ranges = [request.get("range") for request in files.requests_for("/packages/otelcol/2")]
    assert len(ranges) == 2 and ranges[0] is None
    assert 0 < int(ranges[1].removeprefix("bytes=").removesuffix("-")) <= 1024  # what the first process had
    assert reports[-1].packages["otelcol"].status == INSTALLED
    assert (settings.packages.directory / "otelcol" / "current" / "otelcol").read_bytes() == body


def downloaded_some(statuses: pb.PackageStatuses) -> bool:
    status = statuses.packages["otelcol"]
    return status.status == DOWNLOADING and status.download_details.download_percent > 0
