"""PackagesAvailable through the in-process session: only to agents that accept packages,
the hashes as the OpAMP specification asks, no re-offer loop, a failed version held."""

from __future__ import annotations

import hashlib
import uuid
from urllib.parse import urlsplit

import pytest
from channels.db import database_sync_to_async

from fleet.agent_labels import agent_labels_set
from fleet.session_contributor import ReplyPart
from opamp.capabilities import AgentCapabilities, ServerCapabilities
from opamp.identifiers import uuid7
from opamp.package_signature import verify_package_file
from opamp.proto import opamp_pb2
from opamp_site.asgi import application
from rollouts import package_contributor, packages
from rollouts.models import Package, PackageAssignment
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat
from tests.rollouts.package_helpers import asgi_get, make_version, package_dir, signing_key  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ACCEPTS = BASE_CAPABILITIES | int(AgentCapabilities.ACCEPTS_PACKAGES) | int(AgentCapabilities.REPORTS_PACKAGE_STATUSES)
LINUX = {"os.type": "linux", "host.arch": "amd64"}
V1 = b"collector 1.0.0 for linux/amd64\n" * 100
V2 = b"collector 2.0.0 for linux/amd64\n" * 100


@pytest.fixture(autouse=True)
def check_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each message looks for changed assignments (the process does so once a second)."""
    monkeypatch.setattr(package_contributor, "CHECK_SECONDS", -1.0)


@database_sync_to_async
def assign(version: str = "1.0.0", data: bytes = V1, selector: str = "") -> None:
    make_version(version=version, files={("linux", "amd64"): data, ("", ""): b"portable " + data})
    package = Package.objects.get()
    existing = PackageAssignment.objects.filter(name="collectors").first()
    if existing is None:
        packages.package_assignment_create(
            name="collectors", package=package, version=version, selector=selector, actor=None
        )
    else:
        packages.package_assignment_update(assignment=existing, version=version, actor=None)


def report(uid: bytes, seq: int = 1, capabilities: int = ACCEPTS) -> opamp_pb2.AgentToServer:
    return full_report(uid, seq, capabilities=capabilities, extra_identifying=LINUX)


def statuses(
    message: opamp_pb2.AgentToServer, offered: opamp_pb2.ServerToAgent | None, status: int, hash_echoed: bool = True
) -> opamp_pb2.AgentToServer:
    """`message` carrying PackageStatuses about the offer `offered` (the collector's)."""
    available = offered.packages_available if offered is not None else None
    if available is not None and hash_echoed:
        message.package_statuses.server_provided_all_packages_hash = available.all_packages_hash
    entry = message.package_statuses.packages["collector"]
    entry.name = "collector"
    entry.status = status
    if available is not None:
        package = available.packages["collector"]
        entry.server_offered_version = package.version
        entry.server_offered_hash = package.hash
        if status == opamp_pb2.PackageStatusEnum_Installed:
            entry.agent_has_version, entry.agent_has_hash = package.version, package.hash
    message.package_statuses.SetInParent()
    return message


async def test_an_agent_that_accepts_packages_is_offered_its_set(package_dir, signing_key):  # noqa: F811
    await assign()
    async with WsAgent() as agent:
        reply = await agent.exchange(report(uuid7().bytes))
    assert reply.capabilities & ServerCapabilities.OFFERS_PACKAGES
    assert reply.capabilities & ServerCapabilities.ACCEPTS_PACKAGES_STATUS
    available = reply.packages_available
    assert list(available.packages) == ["collector"]
    package = available.packages["collector"]
    assert (package.type, package.version) == (opamp_pb2.PackageType_TopLevel, "1.0.0")
    assert package.file.content_hash == hashlib.sha256(V1).digest()  # the linux/amd64 file
    verify_package_file(
        package.file.signature,
        package="collector",
        version="1.0.0",
        content_sha256=hashlib.sha256(V1).hexdigest(),
        trusted_keys={signing_key.key_id: signing_key.public_key},
    )
    assert len(package.hash) == 32 and len(available.all_packages_hash) == 32
    # The URL downloads exactly the bytes the content hash names.
    url = urlsplit(package.file.download_url)
    status, _, body = await asgi_get(application, url.path, host=url.netloc.encode())
    assert (status, body) == (200, V1)


async def test_agents_that_do_not_accept_packages_get_none(package_dir):  # noqa: F811
    await assign()
    async with WsAgent() as agent:
        reply = await agent.exchange(report(uuid7().bytes, capabilities=BASE_CAPABILITIES))
    assert not reply.HasField("packages_available")
    assert reply.capabilities & ServerCapabilities.OFFERS_PACKAGES  # the server still offers packages


async def test_an_agent_no_assignment_matches_gets_no_offer(package_dir):  # noqa: F811
    await assign(selector="env=nowhere")
    async with WsAgent() as agent:
        reply = await agent.exchange(report(uuid7().bytes))
    assert not reply.HasField("packages_available")


async def test_an_agent_left_out_by_a_changed_assignment_gets_the_empty_set_with_its_hash(package_dir):  # noqa: F811
    await assign()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        offer = await agent.exchange(report(uid, 1))
        installed = statuses(heartbeat(uid, 2, capabilities=ACCEPTS), offer, opamp_pb2.PackageStatusEnum_Installed)
        assert not (await agent.exchange(installed)).HasField("packages_available")
        await database_sync_to_async(_select_nobody)()
        # It has the collector installed: the empty set tells it to remove it.
        emptied = await agent.exchange(heartbeat(uid, 3, capabilities=ACCEPTS))
    assert emptied.HasField("packages_available")
    assert dict(emptied.packages_available.packages) == {}
    assert len(emptied.packages_available.all_packages_hash) == 32


def _select_nobody() -> None:
    assignment = PackageAssignment.objects.get(name="collectors")
    packages.package_assignment_update(assignment=assignment, selector="env=nowhere", actor=None)


async def test_other_platforms_get_the_file_for_every_platform(package_dir):  # noqa: F811
    await assign()
    message = full_report(
        uuid7().bytes, 1, capabilities=ACCEPTS, extra_identifying={"os.type": "windows", "host.arch": "amd64"}
    )
    async with WsAgent() as agent:
        reply = await agent.exchange(message)
    file = reply.packages_available.packages["collector"].file
    assert file.content_hash == hashlib.sha256(b"portable " + V1).digest()


async def test_the_hashes_are_stable_and_change_with_the_set(package_dir):  # noqa: F811
    await assign()
    async with WsAgent() as first, WsAgent() as second:
        one = (await first.exchange(report(uuid7().bytes))).packages_available
        two = (await second.exchange(report(uuid7().bytes))).packages_available
    # The same set: the same hashes, though each agent has its own download URL.
    assert one.all_packages_hash == two.all_packages_hash
    assert one.packages["collector"].hash == two.packages["collector"].hash
    assert one.packages["collector"].file.download_url != two.packages["collector"].file.download_url
    await assign("2.0.0", V2)
    async with WsAgent() as third:
        three = (await third.exchange(report(uuid7().bytes))).packages_available
    assert three.all_packages_hash != one.all_packages_hash
    assert three.packages["collector"].hash != one.packages["collector"].hash


async def test_no_reoffer_loop_and_a_changed_set_is_offered_again(package_dir):  # noqa: F811
    await assign()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        offer = await agent.exchange(report(uid, 1))
        assert offer.HasField("packages_available")
        # Not again on this connection, before the agent answered.
        assert not (await agent.exchange(heartbeat(uid, 2, capabilities=ACCEPTS))).HasField("packages_available")
        # The agent echoes the aggregate it was given: nothing to send.
        installing = statuses(heartbeat(uid, 3, capabilities=ACCEPTS), offer, opamp_pb2.PackageStatusEnum_Installing)
        assert not (await agent.exchange(installing)).HasField("packages_available")
        installed = statuses(heartbeat(uid, 4, capabilities=ACCEPTS), offer, opamp_pb2.PackageStatusEnum_Installed)
        assert not (await agent.exchange(installed)).HasField("packages_available")
        for seq in range(5, 8):
            assert not (await agent.exchange(heartbeat(uid, seq, capabilities=ACCEPTS))).HasField("packages_available")
        # A new version assigned: the next message carries the new set.
        await assign("2.0.0", V2)
        changed = await agent.exchange(heartbeat(uid, 8, capabilities=ACCEPTS))
    assert changed.packages_available.packages["collector"].version == "2.0.0"
    assert changed.packages_available.all_packages_hash != offer.packages_available.all_packages_hash
    # Reconnecting with the new aggregate echoed: nothing offered.
    async with WsAgent() as agent:
        again = statuses(report(uid, 9), changed, opamp_pb2.PackageStatusEnum_Installed)
        assert not (await agent.exchange(again)).HasField("packages_available")


async def test_a_reconnect_without_the_current_aggregate_is_offered_again(package_dir):  # noqa: F811
    await assign()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        assert (await agent.exchange(report(uid, 1))).HasField("packages_available")
    async with WsAgent() as agent:  # the offer may have been lost with the connection
        assert (await agent.exchange(report(uid, 2))).HasField("packages_available")


async def test_a_version_that_failed_is_held_until_the_set_changes(package_dir):  # noqa: F811
    await assign()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        offer = await agent.exchange(report(uid, 1))
    # The agent failed to install it and does not echo the aggregate: the failure answers
    # the offer, so neither a reconnect nor its next messages get the same set again.
    async with WsAgent() as agent:
        failed = statuses(report(uid, 2), offer, opamp_pb2.PackageStatusEnum_InstallFailed, hash_echoed=False)
        assert not (await agent.exchange(failed)).HasField("packages_available")
        for seq in range(3, 6):
            assert not (await agent.exchange(heartbeat(uid, seq, capabilities=ACCEPTS))).HasField("packages_available")
        await assign("2.0.0", V2)
        fixed = await agent.exchange(heartbeat(uid, 6, capabilities=ACCEPTS))
    assert fixed.packages_available.packages["collector"].version == "2.0.0"


async def test_polling_agents_are_not_offered_on_every_poll(package_dir, settings):  # noqa: F811
    settings.OPAMP_REMOTE_CONFIG_REOFFER_SECONDS = 3600
    await assign()
    uid = uuid7().bytes
    assert (await http_exchange(report(uid, 1))).HasField("packages_available")
    for seq in range(2, 5):
        assert not (await http_exchange(heartbeat(uid, seq, capabilities=ACCEPTS))).HasField("packages_available")
    settings.OPAMP_REMOTE_CONFIG_REOFFER_SECONDS = 0
    assert (await http_exchange(heartbeat(uid, 5, capabilities=ACCEPTS))).HasField("packages_available")


async def test_an_operator_label_change_moves_the_agent_to_its_new_set(package_dir, settings):  # noqa: F811
    await assign(selector="env=prod")
    uid = uuid7().bytes
    async with WsAgent() as agent:
        first = await agent.exchange(report(uid, 1))
        assert not first.HasField("packages_available")
        agent_row = await database_sync_to_async(_set_label)(uid, "env", "prod")
        assert agent_row
        moved = await agent.exchange(heartbeat(uid, 2, capabilities=ACCEPTS))
    assert list(moved.packages_available.packages) == ["collector"]


def _set_label(uid: bytes, key: str, value: str) -> bool:
    agent_labels_set(instance_uid=uuid.UUID(bytes=uid), labels={key: value}, actor=None, replace=False)
    return True


async def test_the_command_still_comes_last() -> None:
    assert ReplyPart.QUEUED_CUSTOM_MESSAGE < ReplyPart.PACKAGES_AVAILABLE < ReplyPart.COMMAND


async def test_a_changed_assignment_is_pushed_to_a_live_agent_at_once(package_dir, monkeypatch):  # noqa: F811
    # A process looks for changed assignments once a minute here: only the hint can be in time.
    monkeypatch.setattr(package_contributor, "CHECK_SECONDS", 60.0)
    await assign()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        offer = await agent.exchange(report(uid, 1))
        installed = statuses(heartbeat(uid, 2, capabilities=ACCEPTS), offer, opamp_pb2.PackageStatusEnum_Installed)
        assert not (await agent.exchange(installed)).HasField("packages_available")
        await assign("2.0.0", V2)  # no message from the agent: the hint pushes the new set
        pushed = await agent.receive(timeout=5)
    assert pushed.packages_available.packages["collector"].version == "2.0.0"
