"""Which packages an agent should have, their OpAMP hashes, and when to offer them (pure).

The desired set: per package, the highest-priority assignment whose selector matches the
agent's labels, with the version's file for the agent's platform (`os.type`, `host.arch`
as its description states them), else the version's file for every platform; a version
with neither is left out for that agent (it could not install it).

Hashes, as the OpAMP specification asks:
- `PackageAvailable.hash` is computed from the other fields of the PackageAvailable and
  the file's content: the package name, type, version, the SHA-256 of the bytes served and
  the signature document. Not the download URL or headers: they are per agent and expire,
  and a hash that changed with them would make every agent download again.
- `all_packages_hash` aggregates every offered package's name and hash, so it changes
  exactly when the set an agent should have changes. It is always set, for an empty set too.

When to offer: the agent echoes the aggregate it was last given in
`PackageStatuses.server_provided_all_packages_hash`; while that matches, nothing is sent.
When it differs, the set is offered, but not twice on one connection, and to polling
agents not again before `reoffer_after_seconds`. A version the agent reports
InstallFailed for is held, as a failed remote config is: the failure answers the offer,
so a set that differs from the agent's only by failed versions is not offered again until
the desired set changes. An empty set is offered only to an agent that reports packages
(it has something to remove): to any other it would change nothing, and an agent that
reads an empty offer as "remove what you have" could drop packages it installed itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet.label_selectors.selector import LabelSelector
from opamp.proto import opamp_pb2

OS_ATTRIBUTE = "os.type"
ARCH_ATTRIBUTE = "host.arch"
PACKAGE_HASH_DOMAIN = b"opamp-package-available/v1\n"
ALL_PACKAGES_HASH_DOMAIN = b"opamp-packages-available/v1\n"
INSTALL_FAILED = "InstallFailed"
INSTALLED = "Installed"


@dataclass(frozen=True)
class OfferedFile:
    file_id: int
    os: str
    arch: str
    sha256: str  # hex, of the exact bytes served
    size: int
    signature: str  # opamp.package_signature document, "" when unsigned


@dataclass(frozen=True)
class AssignedVersion:
    """A package version an assignment names, with its files by platform."""

    package: str
    wire_type: int  # opamp_pb2.PackageType value
    version: str
    version_id: int
    files: Mapping[tuple[str, str], OfferedFile]

    def file_for(self, os: str, arch: str) -> OfferedFile | None:
        return self.files.get((os, arch)) or self.files.get(("", ""))


class CohortPlan(Protocol):
    """An active rollout's cohorts (rollouts.rollout_plans.RolloutPlan): which version an agent runs."""

    @property
    def stable_version_id(self) -> int: ...

    def version_for(self, instance_uid: bytes, labels: Mapping[str, str]) -> tuple[int, int | None, int]: ...


@dataclass(frozen=True)
class PackageRollout:
    """An active rollout of a package: agents its plan puts in a started stage get
    `candidate` where an assignment gives them the rollout's stable version."""

    plan: CohortPlan
    candidate: AssignedVersion

    def version_for(self, assigned: AssignedVersion, instance_uid: bytes, labels: Mapping[str, str]) -> AssignedVersion:
        if assigned.version_id != self.plan.stable_version_id or not instance_uid:
            return assigned
        version_id, _, _ = self.plan.version_for(instance_uid, labels)
        return self.candidate if version_id == self.candidate.version_id else assigned


@dataclass(frozen=True)
class PackageRule:
    """One assignment, in precedence order (priority, then name)."""

    selector: LabelSelector
    version: AssignedVersion


@dataclass(frozen=True)
class DesiredPackage:
    name: str
    wire_type: int
    version: str
    version_id: int
    file: OfferedFile
    hash: bytes


@dataclass(frozen=True)
class DesiredPackages:
    packages: Mapping[str, DesiredPackage]
    all_packages_hash: bytes


def platform_of(attributes: Mapping[str, Any], fallback: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(os, arch) from the description's attributes (identifying first, then the others)."""

    def read(name: str) -> str:
        for source in (attributes, fallback or {}):
            value = source.get(name)
            if value not in (None, ""):
                return str(value)
        return ""

    return read(OS_ATTRIBUTE), read(ARCH_ATTRIBUTE)


def package_hash(name: str, wire_type: int, version: str, file: OfferedFile) -> bytes:
    body = {"name": name, "type": wire_type, "version": version, "sha256": file.sha256, "signature": file.signature}
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hashlib.sha256(PACKAGE_HASH_DOMAIN + encoded).digest()


def all_packages_hash(packages: Mapping[str, DesiredPackage]) -> bytes:
    digest = hashlib.sha256(ALL_PACKAGES_HASH_DOMAIN)
    for name in sorted(packages):
        encoded = name.encode("utf-8")
        # Length-prefixed: no two sets encode alike.
        digest.update(len(encoded).to_bytes(4, "big") + encoded + packages[name].hash)
    return digest.digest()


def desired_packages(
    labels: Mapping[str, str],
    os: str,
    arch: str,
    rules: Sequence[PackageRule],
    *,
    instance_uid: bytes = b"",
    rollouts: Mapping[str, PackageRollout] | None = None,
) -> DesiredPackages:
    """`rollouts` (package name -> its active rollout) move the agent `instance_uid` to a
    candidate when its cohort has started."""
    chosen: dict[str, DesiredPackage] = {}
    decided: set[str] = set()
    for rule in rules:
        name = rule.version.package
        if name in decided or not rule.selector.matches(labels):
            continue
        decided.add(name)  # the highest-priority match decides, even without a file here
        assigned = rule.version
        rollout = (rollouts or {}).get(name)
        if rollout is not None:
            assigned = rollout.version_for(assigned, instance_uid, labels)
        file = assigned.file_for(os, arch)
        if file is None:
            continue
        chosen[name] = DesiredPackage(
            name=name,
            wire_type=assigned.wire_type,
            version=assigned.version,
            version_id=assigned.version_id,
            file=file,
            hash=package_hash(name, assigned.wire_type, assigned.version, file),
        )
    return DesiredPackages(packages=chosen, all_packages_hash=all_packages_hash(chosen))


@dataclass(frozen=True)
class ReportedPackage:
    status: str
    server_offered_version: str
    server_offered_hash: str  # hex
    agent_has_version: str
    agent_has_hash: str  # hex


@dataclass(frozen=True)
class ReportedPackages:
    """What the agent last said in PackageStatuses (hashes as hex)."""

    server_provided_all_packages_hash: str = ""
    packages: Mapping[str, ReportedPackage] = field(default_factory=dict)

    @classmethod
    def from_document(cls, document: Any) -> ReportedPackages:
        """From the JSON stored on the agent's row (fleet.reports.package_statuses_to_dict)."""
        if not isinstance(document, dict):
            return cls()
        packages = {}
        for name, entry in (document.get("packages") or {}).items():
            if isinstance(entry, dict):
                packages[name] = ReportedPackage(
                    status=str(entry.get("status", "")),
                    server_offered_version=str(entry.get("server_offered_version", "")),
                    server_offered_hash=str(entry.get("server_offered_hash", "")),
                    agent_has_version=str(entry.get("agent_has_version", "")),
                    agent_has_hash=str(entry.get("agent_has_hash", "")),
                )
        return cls(str(document.get("server_provided_all_packages_hash", "")), packages)

    @classmethod
    def from_message(cls, statuses: opamp_pb2.PackageStatuses) -> ReportedPackages:
        packages = {
            name: ReportedPackage(
                status=opamp_pb2.PackageStatusEnum.Name(status.status).removeprefix("PackageStatusEnum_")
                if status.status in opamp_pb2.PackageStatusEnum.values()
                else str(status.status),
                server_offered_version=status.server_offered_version,
                server_offered_hash=status.server_offered_hash.hex(),
                agent_has_version=status.agent_has_version,
                agent_has_hash=status.agent_has_hash.hex(),
            )
            for name, status in statuses.packages.items()
        }
        return cls(statuses.server_provided_all_packages_hash.hex(), packages)


def _settled(package: DesiredPackage, reported: ReportedPackage | None) -> bool:
    """The agent has this package, or already failed to install this very version."""
    if reported is None:
        return False
    wanted = package.hash.hex()
    if reported.agent_has_hash == wanted and reported.status == INSTALLED:
        return True
    failed_here = reported.status == INSTALL_FAILED and (
        reported.server_offered_hash == wanted or reported.server_offered_version == package.version
    )
    return failed_here


def held_by_failure(desired: DesiredPackages, reported: ReportedPackages) -> bool:
    """Whether the set differs from the agent's only by versions that failed there: every
    desired package is installed or failed at this version, at least one failed, and the
    agent reports nothing the set would remove."""
    statuses = reported.packages
    if set(statuses) - set(desired.packages):
        return False
    if not all(_settled(package, statuses.get(name)) for name, package in desired.packages.items()):
        return False
    return any(statuses[name].status == INSTALL_FAILED for name in desired.packages)


@dataclass(frozen=True)
class PackageOfferContext:
    reported: ReportedPackages
    # The aggregate last offered on this WebSocket connection ("" on HTTP, where each poll is new).
    last_offered_on_connection: str
    persistent_connection: bool
    # When this process last offered this aggregate to the agent (None: never).
    offered_at: float | None
    now: float
    reoffer_after_seconds: float


def should_offer_packages(desired: DesiredPackages, context: PackageOfferContext) -> bool:
    current = desired.all_packages_hash.hex()
    if context.reported.server_provided_all_packages_hash == current:
        return False
    if not desired.packages and not context.reported.packages:
        return False  # nothing to install and nothing to remove
    if current == context.last_offered_on_connection:
        return False  # sent on this connection; the agent has not answered yet
    if held_by_failure(desired, context.reported):
        return False
    if context.persistent_connection:
        return True  # a new connection: the previous one may have lost the offer
    return context.offered_at is None or context.now - context.offered_at >= context.reoffer_after_seconds


def fill_packages_available(
    reply: opamp_pb2.ServerToAgent, desired: DesiredPackages, urls: Mapping[int, str], headers: Mapping[str, str]
) -> None:
    """The full desired set; `urls`: file id -> this agent's download URL."""
    available = reply.packages_available
    available.all_packages_hash = desired.all_packages_hash
    for name, package in desired.packages.items():
        entry = available.packages[name]
        entry.type = package.wire_type
        entry.version = package.version
        entry.hash = package.hash
        entry.file.download_url = urls[package.file.file_id]
        entry.file.content_hash = bytes.fromhex(package.file.sha256)
        entry.file.signature = package.file.signature.encode("ascii")
        for key, value in headers.items():
            header = entry.file.headers.headers.add()
            header.key = key
            header.value = value
    if not desired.packages:
        # An empty map is still an offer: mark the field present.
        reply.packages_available.SetInParent()
