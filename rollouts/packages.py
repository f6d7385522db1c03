"""Writes for packages, their versions and files, and package assignments.

Each write is one transaction and audited (fleet.audit). A file's bytes are streamed into
storage before its transaction (rollouts.package_files) and deleted again when the row
cannot be written. Every write the package resolver reads (assignments, files of a
version) replaces the packages token (rollouts.package_assignments), so each server
process reloads the definitions and recomputes its agents' package sets.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from fleet.safe_text import text_problem
from rollouts.models import Package, PackageAssignment, PackageFile, PackageVersion
from rollouts.package_assignments import bump_packages, hint_agents
from rollouts.package_files import Readable, delete_stored_file, sign_package, store_package_file

PACKAGE_NAME_TAKEN = "a package named {name!r} already exists"
PACKAGE_VERSION_TAKEN = "package {name!r} already has a version {version!r}; versions are immutable"
PACKAGE_FILE_TAKEN = (
    "package {name!r} version {version!r} already has a file for {platform}; files are immutable, upload a new version"
)
ASSIGNMENT_NAME_TAKEN = "a package assignment named {name!r} already exists"
NO_SUCH_PACKAGE_VERSION = "package {name!r} has no version {version!r}"
VERSION_HAS_NO_FILES = "package {name!r} version {version!r} has no file yet; upload one before assigning it"
PLATFORM_TEXT = "{field} {problem}"
PLATFORM_TOO_LONG = "{field} must be at most 64 characters"


def platform_label(os: str, arch: str) -> str:
    return f"{os or 'any'}/{arch or 'any'}"


def _canonical_selector(selector: Any) -> dict[str, Any]:
    try:
        return parse_selector(selector).to_dict()
    except SelectorError as error:
        raise DomainError(str(error), field="selector") from None


@transaction.atomic
def package_create(*, name: str, type: str = "top_level", description: str = "", actor: Actor) -> Package:
    if Package.objects.filter(name=name).exists():
        raise DomainError(PACKAGE_NAME_TAKEN.format(name=name), field="name", status=409)
    package = Package(name=name, type=type, description=description, created_by=actor_user(actor))
    package.full_clean()
    package.save()
    audit_record(actor=actor, action="package.create", target=package, details={"name": name, "type": type})
    return package


@transaction.atomic
def package_version_create(*, package: Package, version: str, note: str = "", actor: Actor) -> PackageVersion:
    if PackageVersion.objects.filter(package=package, version=version).exists():
        raise DomainError(PACKAGE_VERSION_TAKEN.format(name=package.name, version=version), field="version", status=409)
    row = PackageVersion(package=package, version=version, note=note, created_by=actor_user(actor))
    row.full_clean()
    row.save()
    audit_record(
        actor=actor, action="package.version.create", target=row, details={"package": package.name, "version": version}
    )
    return row


def _check_platform(os: str, arch: str) -> None:
    for field, value in (("os", os), ("arch", arch)):
        problem = text_problem(value)
        if problem:
            raise DomainError(PLATFORM_TEXT.format(field=field, problem=problem), field=field)
        if len(value) > 64:
            raise DomainError(PLATFORM_TOO_LONG.format(field=field), field=field)


def _file_taken(version: PackageVersion, os: str, arch: str) -> DomainError:
    message = PACKAGE_FILE_TAKEN.format(
        name=version.package.name, version=version.version, platform=platform_label(os, arch)
    )
    return DomainError(message, field="file", status=409)


def package_file_upload(
    *, version: PackageVersion, source: Readable, os: str = "", arch: str = "", actor: Actor
) -> PackageFile:
    """Store the bytes of `source` as the version's file for (os, arch) and sign them.

    A platform that already has a file is refused (409) before a byte is stored, and again
    under the version's row lock after (two concurrent uploads: one wins, the other's bytes
    are deleted). Over OPAMP_PACKAGE_MAX_BYTES: 413.
    """
    _check_platform(os, arch)
    if PackageFile.objects.filter(version=version, os=os, arch=arch).exists():
        raise _file_taken(version, os, arch)
    stored = store_package_file(source, package_id=version.package_id)
    try:
        return _record_file(version=version, os=os, arch=arch, stored=stored, actor=actor)
    except BaseException:
        delete_stored_file(stored.storage_name)
        raise


@transaction.atomic
def _record_file(*, version: PackageVersion, os: str, arch: str, stored: Any, actor: Actor) -> PackageFile:
    version = PackageVersion.objects.select_for_update().select_related("package").get(pk=version.pk)
    if PackageFile.objects.filter(version=version, os=os, arch=arch).exists():
        raise _file_taken(version, os, arch)
    signed = sign_package(package=version.package.name, version=version.version, sha256=stored.sha256)
    row = PackageFile(
        version=version,
        os=os,
        arch=arch,
        storage_name=stored.storage_name,
        size=stored.size,
        sha256=stored.sha256,
        signature=signed.to_json_bytes().decode("ascii") if signed else "",
        key_id=signed.envelope.key_id if signed else "",
        uploaded_by=actor_user(actor),
    )
    try:
        with transaction.atomic():
            row.save()
    except IntegrityError:
        raise _file_taken(version, os, arch) from None
    bump_packages()
    audit_record(
        actor=actor,
        action="package.file.upload",
        target=row,
        details={
            "package": version.package.name,
            "version": version.version,
            "platform": platform_label(os, arch),
            "sha256": stored.sha256,
            "size": stored.size,
            "signed_with": row.key_id,
        },
    )
    return row


def package_version_named(package: Package, version: str, *, field: str = "version") -> PackageVersion:
    """The package's version of that name; refused, naming `field`, when there is none."""
    row = PackageVersion.objects.filter(package=package, version=version).first()
    if row is None:
        raise DomainError(NO_SUCH_PACKAGE_VERSION.format(name=package.name, version=version), field=field)
    return row


def _assignable_version(package: Package, version: str) -> PackageVersion:
    row = package_version_named(package, version)
    if not row.files.exists():
        raise DomainError(VERSION_HAS_NO_FILES.format(name=package.name, version=version), field="version")
    return row


@transaction.atomic
def package_assignment_create(
    *, name: str, package: Package, version: str, selector: Any = None, priority: int = 0, actor: Actor
) -> PackageAssignment:
    if PackageAssignment.objects.filter(name=name).exists():
        raise DomainError(ASSIGNMENT_NAME_TAKEN.format(name=name), field="name", status=409)
    assignment = PackageAssignment(
        name=name,
        package=package,
        version=_assignable_version(package, version),
        selector=_canonical_selector(selector),
        priority=priority,
        created_by=actor_user(actor),
    )
    assignment.full_clean()
    assignment.save()
    bump_packages()
    hint_agents(selectors=[assignment.selector])
    audit_record(
        actor=actor,
        action="package.assignment.create",
        target=assignment,
        details={
            "name": name,
            "package": package.name,
            "version": version,
            "selector": assignment.selector,
            "priority": priority,
        },
    )
    return assignment


@transaction.atomic
def package_assignment_update(
    *,
    assignment: PackageAssignment,
    actor: Actor,
    version: str | None = None,
    selector: Any = None,
    priority: int | None = None,
) -> PackageAssignment:
    """Move an assignment to another version, selector or priority (the package stays)."""
    assignment = (
        PackageAssignment.objects.select_for_update().select_related("package", "version").get(pk=assignment.pk)
    )
    changes: dict[str, Any] = {}
    selected_before = assignment.selector
    if version is not None and version != assignment.version.version:
        assignment.version = _assignable_version(assignment.package, version)
        changes["version"] = version
    if selector is not None:
        canonical = _canonical_selector(selector)
        if canonical != assignment.selector:
            assignment.selector = changes["selector"] = canonical
    if priority is not None and priority != assignment.priority:
        assignment.priority = changes["priority"] = priority
    if not changes:
        return assignment
    assignment.full_clean()
    assignment.save()
    bump_packages()
    hint_agents(selectors=[selected_before] + ([assignment.selector] if "selector" in changes else []))
    audit_record(actor=actor, action="package.assignment.update", target=assignment, details=changes)
    return assignment


@transaction.atomic
def package_assignment_delete(*, assignment: PackageAssignment, actor: Actor) -> None:
    audit_record(actor=actor, action="package.assignment.delete", target=assignment, details={"name": assignment.name})
    hint_agents(selectors=[assignment.selector])
    assignment.delete()
    bump_packages()
