from __future__ import annotations

import pytest
from django.test import Client

from tests.fleet.factories import AgentFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_the_fleet_overview_needs_a_staff_login():
    response = Client().get("/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_fleet_overview_counts_agents_by_status_and_lists_them_escaped():
    AgentFactory(identifying_attributes={"service.name": "<b>checkout</b>"})
    AgentFactory(healthy=False)
    client = Client()
    client.force_login(UserFactory(username="ops", is_staff=True))
    page = client.get("/")
    assert page.status_code == 200
    assert dict(page.context["by_status"]) == {"online": 1, "unhealthy": 1, "offline": 0}
    assert b"&lt;b&gt;checkout&lt;/b&gt;" in page.content
