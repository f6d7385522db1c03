from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fleet.session import reset_runtime
from tests.fleet import factories


@pytest.fixture(autouse=True)
def fresh_fleet_runtime() -> Iterator[None]:
    reset_runtime()
    yield
    reset_runtime()


@pytest.fixture
def operator_user(db: Any) -> Any:
    return factories.UserFactory(username="alice")
