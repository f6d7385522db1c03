"""Every list of the API pages with a bounded `limit`: a limit over the cap is served as the
cap, never handed to the database (a 26-digit limit was an HTTP 500, "bigint out of range",
on PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.api.pagination import MAX_PAGE_LIMIT
from fleet.models import Agent
from opamp.identifiers import uuid7
from rollouts.services import configuration_create
from signing.enrollment_tokens import enrollment_token_create

pytestmark = pytest.mark.django_db

HUGE = "81641169004891246721761280"
LISTS = ["agents", "audit", "configurations", "enrollment-tokens"]


@pytest.fixture
def one_of_each(db: Any) -> None:
    """A row in each list: an empty list is answered before any query is made."""
    Agent.objects.create(instance_uid=uuid7(), last_seen=timezone.now())
    configuration_create(name="edge", selector="env=prod", actor=None)  # audited too
    enrollment_token_create(
        name="t", expires_in=timedelta(hours=1), max_uses=1, labels=None, auto_approve=False, actor=None
    )


@pytest.mark.parametrize("name", LISTS)
@pytest.mark.parametrize("limit", [HUGE, str(2**63), str(MAX_PAGE_LIMIT + 1)])
def test_a_limit_over_the_cap_is_served_as_the_cap(
    api_client: APIClient, one_of_each: None, name: str, limit: str
) -> None:
    response = api_client.get(f"/api/v1/{name}/", {"limit": limit})

    assert response.status_code == 200, response.content
    body = response.json()
    assert "results" in body and len(body["results"]) >= 1


def test_the_cap_bounds_what_one_page_returns(api_client: APIClient, settings: Any) -> None:
    now = timezone.now()
    Agent.objects.bulk_create(Agent(instance_uid=uuid7(), last_seen=now) for _ in range(MAX_PAGE_LIMIT + 5))

    body = api_client.get("/api/v1/agents/", {"limit": HUGE}).json()

    assert body["count"] == MAX_PAGE_LIMIT + 5
    assert len(body["results"]) == MAX_PAGE_LIMIT
    assert f"limit={MAX_PAGE_LIMIT}" in body["next"]


def test_a_huge_offset_is_an_empty_page(api_client: APIClient) -> None:
    response = api_client.get("/api/v1/agents/", {"offset": HUGE})

    assert response.status_code == 200
    assert response.json()["results"] == []
