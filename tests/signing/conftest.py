from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signing.ca import LoadedCa, create_ca, write_ca
from signing.file_cache import reset_file_cache
from tests.fleet import factories


@dataclass(frozen=True)
class CaFiles:
    ca: LoadedCa
    key_file: Path
    cert_file: Path


@pytest.fixture(scope="session")
def ca_files(tmp_path_factory: pytest.TempPathFactory) -> CaFiles:
    directory = tmp_path_factory.mktemp("ca")
    ca = create_ca(common_name="Test agent CA", days=365)
    write_ca(ca, key_file=directory / "ca.key", cert_file=directory / "ca.pem")
    return CaFiles(ca=ca, key_file=directory / "ca.key", cert_file=directory / "ca.pem")


@pytest.fixture(autouse=True)
def forget_loaded_files() -> Iterator[None]:
    reset_file_cache()
    yield
    reset_file_cache()


@pytest.fixture
def configured_ca(settings: Any, ca_files: CaFiles) -> CaFiles:
    settings.OPAMP_CA_KEY_FILE = str(ca_files.key_file)
    settings.OPAMP_CA_CERT_FILE = str(ca_files.cert_file)
    return ca_files


@pytest.fixture
def operator(db: Any) -> Any:
    return factories.UserFactory(username="operator", is_staff=True, is_superuser=True)
