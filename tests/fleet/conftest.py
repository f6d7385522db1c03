from __future__ import annotations

from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fleet.roles import OPERATOR, grant_role
from tests.fleet import factories


@pytest.fixture
def operator(db: Any) -> Any:
    user = factories.UserFactory(username="operator")
    grant_role(user=user, role=OPERATOR)
    return user


@pytest.fixture
def api_client(operator: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=operator)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client
