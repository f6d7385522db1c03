"""The REST API fuzzed from its own OpenAPI schema (schemathesis): no request an
authenticated operator can send gets a 5xx.

The schema is the one `/api/v1/schema/` serves (drf-spectacular). Every operation gets
generated requests (valid and invalid bodies, path and query parameters, including NUL
and other odd text) against the application in-process (WSGI), with a few objects
present so that some paths exist. Examples per operation stay modest so that CI stays
fast; OPAMP_API_FUZZ_EXAMPLES raises them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error

from fleet.models import Agent
from fleet.roles import OPERATOR, grant_role
from opamp.identifiers import uuid7
from rollouts import services
from signing.enrollment_tokens import enrollment_token_create
from tests.fleet import factories

EXAMPLES = int(os.environ.get("OPAMP_API_FUZZ_EXAMPLES", "12"))
FILES = {"app.yaml": {"body": "x: 1\n", "content_type": "text/yaml"}}

schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
schema.app = get_wsgi_application()


@pytest.fixture
def keep_the_test_connection() -> Iterator[None]:
    """As Django's test client does: a request must not close the connection that holds the
    test's transaction (on PostgreSQL the next query would fail in the test's atomic block)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def operator_token(db: Any, keep_the_test_connection: None) -> str:
    """An operator's token, and a small inventory for the generated requests to find."""
    user = factories.UserFactory(username="fuzz-operator")
    grant_role(user=user, role=OPERATOR)
    Agent.objects.create(instance_uid=uuid7(), last_seen=timezone.now(), labels={"env": "prod"})
    configuration = services.configuration_create(name="edge", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=FILES, author=None)
    enrollment_token_create(
        name="fuzz", expires_in=timedelta(days=1), max_uses=5, labels={}, auto_approve=False, actor=user
    )
    token, _ = Token.objects.get_or_create(user=user)
    return token.key


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(case: Any, operator_token: str) -> None:
    case.call_and_validate(headers={"Authorization": f"Token {operator_token}"}, checks=[not_a_server_error])


# What the fuzzing found, kept as plain tests.


def test_options_on_an_agents_labels_describes_the_view(operator_token: str) -> None:
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {operator_token}")
    agent = Agent.objects.get()
    assert client.options(f"/api/v1/agents/{agent.instance_uid}/labels/").status_code == 200


@pytest.mark.parametrize("verb", ["start", "abort", "approve", "events"])
def test_a_rollout_id_that_is_not_a_number_is_not_found(operator_token: str, verb: str) -> None:
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {operator_token}")
    call = client.get if verb == "events" else client.post
    assert call(f"/api/v1/rollouts/null,null/{verb}/").status_code == 404
