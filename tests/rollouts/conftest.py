from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fleet.roles import OPERATOR, VIEWER, grant_role
from tests.fleet import factories


def token_client(user: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def operator(db: Any) -> Any:
    user = factories.UserFactory(username="olivia")
    grant_role(user=user, role=OPERATOR)
    return user


@pytest.fixture
def viewer(db: Any) -> Any:
    user = factories.UserFactory(username="victor")
    grant_role(user=user, role=VIEWER)
    return user


@pytest.fixture
def api(operator: Any) -> APIClient:
    """An API client with the operator role."""
    return token_client(operator)


@pytest.fixture
def viewer_api(viewer: Any) -> APIClient:
    """An API client with the viewer role (read only)."""
    return token_client(viewer)


@pytest.fixture
def root(db: Any) -> Any:
    """A superuser, for the admin pages."""
    return factories.UserFactory(username="root", is_staff=True, is_superuser=True)


@pytest.fixture
def admin_client(root: Any) -> Client:
    client = Client()
    client.force_login(root)
    return client
