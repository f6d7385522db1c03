from __future__ import annotations

from typing import Any

import pytest

from tests.fleet import factories


@pytest.fixture
def operator_user(db: Any) -> Any:
    return factories.UserFactory(username="alice")
