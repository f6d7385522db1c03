"""Installing packages on disk: versioned directories, the atomic switch, the revert, removal."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from agent_client.package_record import FailedPackage, InstalledPackage, PackagesRecord
from agent_client.packages import (
    InstallRefused,
    PackageStore,
    command_start_check,
    install_package,
    package_problem,
    remove_package,
)
from agent_client.state import FileState, StateError


@pytest.fixture
def store(tmp_path: Path) -> PackageStore:
    return PackageStore(tmp_path / "packages")


def downloaded(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / f"download-{len(list(tmp_path.iterdir()))}"
    path.write_bytes(body)
    return path


def install(store: PackageStore, record: PackagesRecord, tmp_path: Path, version: str, **options) -> PackagesRecord:
    arguments = {"package_hash": f"hash-{version}".encode(), "top_level": True, "start_check": None, **options}
    return install_package(
        store, record, name="otelcol", version=version, file=downloaded(tmp_path, version.encode()), **arguments
    )


def test_an_install_lands_in_a_versioned_directory_and_current_points_at_it(store, tmp_path) -> None:
    record = install(store, PackagesRecord(), tmp_path, "1.0.0")

    assert (store.root / "otelcol" / "1.0.0" / "otelcol").read_bytes() == b"1.0.0"
    assert os.readlink(store.current("otelcol")) == "1.0.0"
    assert (store.current("otelcol") / "otelcol").read_bytes() == b"1.0.0"
    assert os.access(store.current("otelcol") / "otelcol", os.X_OK)
    assert record.installed["otelcol"] == InstalledPackage("1.0.0", b"hash-1.0.0", top_level=True)


def test_an_upgrade_switches_and_keeps_only_the_previous_version(store, tmp_path) -> None:
    record = PackagesRecord()
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        record = install(store, record, tmp_path, version)

    assert store.current_version("otelcol") == "3.0.0"
    assert store.versions("otelcol") == {"2.0.0", "3.0.0"}
    assert record.installed["otelcol"].previous_version == "2.0.0"
    # No temporary symlink or staging directory is left behind.
    assert sorted(entry.name for entry in (store.root / "otelcol").iterdir()) == ["2.0.0", "3.0.0", "current"]


def test_a_failed_start_check_reverts_to_the_previous_version(store, tmp_path) -> None:
    record = install(store, PackagesRecord(), tmp_path, "1.0.0")
    checked: list[tuple[str, str, Path]] = []

    def refuses(name: str, version: str, path: Path) -> str:
        checked.append((name, version, path))
        assert (path / "otelcol").read_bytes() == b"2.0.0"  # checked while switched to it
        return "exited with status 1"

    record = install(store, record, tmp_path, "2.0.0", start_check=refuses)

    assert checked == [("otelcol", "2.0.0", store.root / "otelcol" / "2.0.0")]
    assert store.current_version("otelcol") == "1.0.0"
    assert store.versions("otelcol") == {"1.0.0"}
    assert record.installed["otelcol"].version == "1.0.0"
    failure = record.failed["otelcol"]
    assert (failure.version, failure.hash) == ("2.0.0", b"hash-2.0.0")
    assert failure.error_message == "start check failed: exited with status 1; reverted to 1.0.0"


def test_a_failed_first_install_leaves_no_current_version(store, tmp_path) -> None:
    record = install(store, PackagesRecord(), tmp_path, "1.0.0", start_check=lambda *_: "crashed")

    assert store.current_version("otelcol") is None
    assert store.versions("otelcol") == set()
    assert "otelcol" not in record.installed
    assert record.failed["otelcol"].error_message.endswith("no previous version to revert to")


def test_a_start_check_that_raises_counts_as_failed(store, tmp_path) -> None:
    def crashes(*_: object) -> str | None:
        raise RuntimeError("boom")

    record = install(store, PackagesRecord(), tmp_path, "1.0.0", start_check=crashes)
    assert "RuntimeError: boom" in record.failed["otelcol"].error_message


def test_an_add_on_is_not_start_checked(store, tmp_path) -> None:
    record = install(store, PackagesRecord(), tmp_path, "1.0.0", top_level=False, start_check=lambda *_: "never")
    assert record.installed["otelcol"].top_level is False
    assert not os.access(store.current("otelcol") / "otelcol", os.X_OK)


class Runner:
    """A package runner that notes each call with what `current` held then."""

    def __init__(self, store: PackageStore, *, fails: set[str], package: str = "otelcol") -> None:
        self.store, self.fails, self.package = store, fails, package
        self.calls: list[tuple[str, str | None, str | None]] = []

    def runs(self, name: str) -> bool:
        return name == self.package

    def start_checked(self, name: str, version: str, path: Path) -> str | None:
        self.calls.append(("start_checked", version, self.store.current_version(name)))
        return "exited with status 1" if version in self.fails else None

    def restart(self, name: str, version: str | None) -> None:
        self.calls.append(("restart", version, self.store.current_version(name)))


def test_a_runner_is_started_on_the_new_version_and_on_the_old_one_again_when_it_fails(store, tmp_path) -> None:
    runner = Runner(store, fails={"3.0.0"})
    record = install(store, PackagesRecord(), tmp_path, "1.0.0", runner=runner)
    record = install(store, record, tmp_path, "2.0.0", runner=runner)
    record = install(store, record, tmp_path, "3.0.0", runner=runner)

    assert runner.calls == [
        ("start_checked", "1.0.0", "1.0.0"),
        ("start_checked", "2.0.0", "2.0.0"),
        ("start_checked", "3.0.0", "3.0.0"),
        ("restart", "2.0.0", "2.0.0"),  # after the switch back
    ]
    assert store.current_version("otelcol") == "2.0.0" and store.versions("otelcol") == {"2.0.0"}
    assert record.failed["otelcol"].error_message == "start check failed: exited with status 1; reverted to 2.0.0"


def test_a_runner_with_no_version_to_go_back_to_is_told_so(store, tmp_path) -> None:
    runner = Runner(store, fails={"1.0.0"})
    record = install(store, PackagesRecord(), tmp_path, "1.0.0", runner=runner)
    assert runner.calls == [("start_checked", "1.0.0", "1.0.0"), ("restart", None, None)]
    assert record.failed["otelcol"].error_message.endswith("; no previous version to revert to")


def test_a_runner_is_left_alone_when_the_command_check_fails_or_it_runs_another_package(store, tmp_path) -> None:
    runner = Runner(store, fails=set())
    record = install(store, PackagesRecord(), tmp_path, "1.0.0", runner=runner, start_check=lambda *_: "crashed")
    assert "otelcol" in record.failed and runner.calls == []

    other = Runner(store, fails=set(), package="addon")
    record = install(store, PackagesRecord(), tmp_path, "1.0.0", runner=other)
    assert record.installed["otelcol"].version == "1.0.0" and other.calls == []


def test_the_start_check_command_passes_on_exit_0_and_reports_stderr_otherwise(store, tmp_path) -> None:
    passes = command_start_check([sys.executable, "-c", "import sys; sys.exit(0)", "{path}"])
    failing = "import sys; sys.stderr.write(sys.argv[1]); sys.exit(3)"
    fails = command_start_check([sys.executable, "-c", failing, "{version}"])

    assert passes("otelcol", "1.0.0", tmp_path) is None
    assert fails("otelcol", "1.0.0", tmp_path) == f"{sys.executable} exited with status 3: 1.0.0"


def test_the_installed_version_offered_with_other_content_is_refused(store, tmp_path) -> None:
    record = install(store, PackagesRecord(), tmp_path, "1.0.0")
    with pytest.raises(InstallRefused, match="versions are immutable"):
        install(store, record, tmp_path, "1.0.0", package_hash=b"other")
    assert (store.current("otelcol") / "otelcol").read_bytes() == b"1.0.0"


def test_a_version_left_on_disk_by_a_crash_is_placed_afresh(store, tmp_path) -> None:
    stale = store.root / "otelcol" / "2.0.0"
    stale.mkdir(parents=True)
    (stale / "leftover").write_bytes(b"x")

    install(store, PackagesRecord(), tmp_path, "2.0.0")

    assert sorted(path.name for path in stale.iterdir()) == ["otelcol"]


def test_removal_deletes_only_packages_the_server_installed(store, tmp_path) -> None:
    record = install(store, PackagesRecord(), tmp_path, "1.0.0")
    local = store.root / "local-addon"
    local.mkdir()

    record = remove_package(store, record, "otelcol")
    record = remove_package(store, record, "local-addon")

    assert not (store.root / "otelcol").exists()
    assert local.is_dir()
    assert record.installed == {}


@pytest.mark.parametrize(
    ("name", "version"),
    [("../etc", "1"), ("otelcol", "../1"), ("", "1"), ("otelcol", ""), (".hidden", "1"), ("otelcol", "current")],
)
def test_names_that_are_not_plain_are_refused(name: str, version: str) -> None:
    assert package_problem(name, version) is not None


def test_the_record_survives_a_restart_in_the_state_directory(tmp_path) -> None:
    record = PackagesRecord(
        all_packages_hash=b"\x01" * 32,
        installed={"otelcol": InstalledPackage("2.0.0", b"\x02" * 32, top_level=True, previous_version="1.0.0")},
        failed={"addon": FailedPackage("0.2", b"\x03" * 32, "signature refused")},
    )
    FileState(tmp_path).save_packages(record)

    assert FileState(tmp_path).load_packages() == record


def test_a_corrupt_record_is_a_state_error(tmp_path) -> None:
    (tmp_path / "packages.json").write_text('{"installed": []}')
    with pytest.raises(StateError):
        FileState(tmp_path).load_packages()
