"""The desired package set and its hashes (pure): precedence, platforms, the held rule."""

from __future__ import annotations

from fleet.label_selectors.parsing import parse_selector
from opamp.proto import opamp_pb2
from rollouts.package_offers import (
    AssignedVersion,
    OfferedFile,
    PackageOfferContext,
    PackageRule,
    ReportedPackage,
    ReportedPackages,
    all_packages_hash,
    desired_packages,
    held_by_failure,
    platform_of,
    should_offer_packages,
)

ANY = OfferedFile(file_id=1, os="", arch="", sha256="a" * 64, size=1, signature="")
LINUX = OfferedFile(file_id=2, os="linux", arch="amd64", sha256="b" * 64, size=1, signature="")


def version(package: str, number: str, *files: OfferedFile, version_id: int = 1) -> AssignedVersion:
    return AssignedVersion(
        package=package,
        wire_type=opamp_pb2.PackageType_TopLevel,
        version=number,
        version_id=version_id,
        files={(file.os, file.arch): file for file in files},
    )


def rule(selector: str, assigned: AssignedVersion) -> PackageRule:
    return PackageRule(selector=parse_selector(selector), version=assigned)


def test_the_highest_priority_match_decides_per_package() -> None:
    rules = [
        rule("env=prod", version("collector", "2.0", ANY)),
        rule("", version("collector", "1.0", ANY)),
        rule("", version("addon", "0.1", ANY)),
    ]
    prod = desired_packages({"env": "prod"}, "linux", "amd64", rules)
    dev = desired_packages({"env": "dev"}, "linux", "amd64", rules)
    assert {name: p.version for name, p in prod.packages.items()} == {"collector": "2.0", "addon": "0.1"}
    assert {name: p.version for name, p in dev.packages.items()} == {"collector": "1.0", "addon": "0.1"}
    assert prod.all_packages_hash != dev.all_packages_hash


def test_the_platform_file_wins_and_a_version_without_a_fitting_file_is_left_out() -> None:
    rules = [rule("", version("collector", "1.0", LINUX, ANY)), rule("", version("linux-only", "1.0", LINUX))]
    linux = desired_packages({}, "linux", "amd64", rules)
    mac = desired_packages({}, "darwin", "arm64", rules)
    assert linux.packages["collector"].file == LINUX and "linux-only" in linux.packages
    assert mac.packages["collector"].file == ANY and "linux-only" not in mac.packages
    # A match without a file here still decides the package: no fallback to a lower rule.
    shadowed = [rule("", version("linux-only", "2.0", LINUX)), rule("", version("linux-only", "1.0", ANY))]
    assert desired_packages({}, "darwin", "arm64", shadowed).packages == {}


def test_hashes_are_deterministic_and_cover_content_and_version() -> None:
    one = desired_packages({}, "", "", [rule("", version("collector", "1.0", ANY))])
    same = desired_packages({"x": "y"}, "", "", [rule("", version("collector", "1.0", ANY, version_id=9))])
    other_bytes = OfferedFile(file_id=1, os="", arch="", sha256="c" * 64, size=1, signature="")
    changed = desired_packages({}, "", "", [rule("", version("collector", "1.0", other_bytes))])
    renumbered = desired_packages({}, "", "", [rule("", version("collector", "1.1", ANY))])
    assert one.all_packages_hash == same.all_packages_hash
    assert len({one.all_packages_hash, changed.all_packages_hash, renumbered.all_packages_hash}) == 3
    assert all_packages_hash({}) == desired_packages({}, "", "", []).all_packages_hash


def test_platform_comes_from_identifying_then_other_attributes() -> None:
    assert platform_of({"os.type": "linux"}, {"host.arch": "arm64", "os.type": "windows"}) == ("linux", "arm64")
    assert platform_of({}, None) == ("", "")


def reported(status: str, *, offered: str, offered_hash: str = "", all_hash: str = "") -> ReportedPackages:
    entry = ReportedPackage(
        status=status,
        server_offered_version=offered,
        server_offered_hash=offered_hash,
        agent_has_version="",
        agent_has_hash="",
    )
    return ReportedPackages(server_provided_all_packages_hash=all_hash, packages={"collector": entry})


def context(report: ReportedPackages, **overrides: object) -> PackageOfferContext:
    values: dict[str, object] = {
        "reported": report,
        "last_offered_on_connection": "",
        "persistent_connection": True,
        "offered_at": None,
        "now": 100.0,
        "reoffer_after_seconds": 60.0,
    }
    values.update(overrides)
    return PackageOfferContext(**values)  # type: ignore[arg-type]


def test_the_offer_rule() -> None:
    desired = desired_packages({}, "", "", [rule("", version("collector", "1.0", ANY))])
    current = desired.all_packages_hash.hex()
    assert not should_offer_packages(desired, context(ReportedPackages(current)))
    assert should_offer_packages(desired, context(ReportedPackages()))
    assert not should_offer_packages(desired, context(ReportedPackages(), last_offered_on_connection=current))
    polling = {"persistent_connection": False, "offered_at": 90.0}
    assert not should_offer_packages(desired, context(ReportedPackages(), **polling))
    assert should_offer_packages(desired, context(ReportedPackages(), persistent_connection=False, offered_at=10.0))


def test_a_failed_version_is_held_and_a_new_one_is_not() -> None:
    desired = desired_packages({}, "", "", [rule("", version("collector", "1.0", ANY))])
    failed = reported("InstallFailed", offered="1.0")
    assert held_by_failure(desired, failed)
    assert not should_offer_packages(desired, context(failed))
    newer = desired_packages({}, "", "", [rule("", version("collector", "2.0", ANY))])
    assert not held_by_failure(newer, failed)
    assert should_offer_packages(newer, context(failed))
    # Still downloading is no answer: offered again on a new connection.
    assert not held_by_failure(desired, reported("Downloading", offered="1.0"))
