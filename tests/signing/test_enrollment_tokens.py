"""Enrollment tokens: hashed, expiring, revocable, bounded uses, labels for enrolled agents."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from fleet.models import AuditEvent
from opamp.identifiers import uuid7
from signing.enrollment_tokens import (
    enrollment_token_authenticate,
    enrollment_token_create,
    enrollment_token_revoke,
    enrollment_token_use,
)
from signing.errors import (
    TOKEN_EXHAUSTED,
    TOKEN_EXPIRED,
    TOKEN_REVOKED,
    TOKEN_UNKNOWN,
    EnrollmentTokenRefused,
    SigningError,
)
from signing.models import EnrollmentToken, EnrollmentTokenUse
from tests.fleet.factories import AgentFactory

pytestmark = pytest.mark.django_db


def create(**overrides: object) -> tuple[EnrollmentToken, str]:
    arguments: dict = {
        "name": "edge rollout",
        "expires_in": timedelta(hours=1),
        "max_uses": 3,
        "labels": {"env": "prod"},
        "auto_approve": True,
        "actor": None,
    }
    arguments.update(overrides)
    return enrollment_token_create(**arguments)


def refusal_of(secret: str, **kwargs: object) -> str:
    with pytest.raises(EnrollmentTokenRefused) as refused:
        enrollment_token_authenticate(secret, **kwargs)
    assert refused.value.status == 401
    return refused.value.message


def test_only_the_hash_of_the_secret_is_stored(operator):
    token, secret = create(actor=operator)
    assert secret.startswith("opamp_et_") and len(secret) > 40
    assert token.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith(token.prefix) and len(token.prefix) < len(secret) - 30
    row = EnrollmentToken.objects.filter(pk=token.pk).values().get()
    assert all(secret not in str(value) for value in row.values())
    assert all(secret not in str(event.details) for event in AuditEvent.objects.all())
    assert secret not in repr(token) and secret not in str(token)


def test_the_secret_authenticates_its_token():
    token, secret = create()
    assert enrollment_token_authenticate(secret) == token


@pytest.mark.parametrize("secret", ["", "opamp_et_", "opamp_et_guess", "something-else", "x" * 500])
def test_an_unknown_secret_is_refused(secret):
    create()
    assert refusal_of(secret) == TOKEN_UNKNOWN


def test_an_expired_token_is_refused():
    _, secret = create(expires_in=timedelta(minutes=5))
    assert refusal_of(secret, now=timezone.now() + timedelta(minutes=6)) == TOKEN_EXPIRED


def test_a_revoked_token_is_refused_and_revoking_again_changes_nothing(operator):
    token, secret = create()
    assert enrollment_token_revoke(token=token, actor=operator) is True
    assert enrollment_token_revoke(token=token, actor=operator) is False
    assert refusal_of(secret) == TOKEN_REVOKED
    assert AuditEvent.objects.filter(action="enrollment_token.revoke").count() == 1


def test_a_token_is_refused_once_used_its_maximum_number_of_times():
    token, secret = create(max_uses=2)
    enrollment_token_use(token=token, instance_uid=uuid7())
    enrollment_token_use(token=token, instance_uid=uuid7())
    assert refusal_of(secret) == TOKEN_EXHAUSTED
    with pytest.raises(EnrollmentTokenRefused) as refused:
        enrollment_token_use(token=token, instance_uid=uuid7())
    assert refused.value.message == TOKEN_EXHAUSTED
    token.refresh_from_db()
    assert token.use_count == 2
    assert token.uses.count() == 2


def test_the_same_agent_enrolling_again_is_not_a_new_use():
    token, _ = create(max_uses=1)
    uid = uuid7()
    first = enrollment_token_use(token=token, instance_uid=uid)
    again = enrollment_token_use(token=token, instance_uid=uid)
    token.refresh_from_db()
    assert first.pk == again.pk
    assert token.use_count == 1


def test_using_an_expired_token_counts_nothing():
    token, _ = create()
    with pytest.raises(EnrollmentTokenRefused) as refused:
        enrollment_token_use(token=token, instance_uid=uuid7(), now=timezone.now() + timedelta(hours=2))
    assert refused.value.message == TOKEN_EXPIRED
    token.refresh_from_db()
    assert token.use_count == 0
    assert not EnrollmentTokenUse.objects.exists()


def test_the_tokens_labels_are_applied_to_an_enrolled_agent():
    agent = AgentFactory(identifying_attributes={"service.name": "checkout"})
    token, _ = create(labels={"env": "prod", "team": "payments"})
    enrollment_token_use(token=token, instance_uid=agent.instance_uid)
    agent.refresh_from_db()
    assert agent.operator_labels == {"env": "prod", "team": "payments"}
    assert agent.labels["team"] == "payments"


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_uses": 0},
        {"expires_in": timedelta(0)},
        {"name": " "},
        {"labels": {"bad key": "x"}},
        {"labels": {"env": 3}},
        {"labels": ["env"]},
    ],
    ids=["no-uses", "already-expired", "blank-name", "label-key", "label-value", "labels-not-object"],
)
def test_a_token_with_invalid_settings_is_not_created(overrides):
    with pytest.raises(SigningError):
        create(**overrides)
    assert not EnrollmentToken.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_enrolments_never_exceed_max_uses():
    if connection.vendor != "postgresql":
        pytest.skip("row-level concurrency is only meaningful on PostgreSQL")
    token, _ = create(max_uses=3, labels={})
    workers = 10
    barrier = threading.Barrier(workers)
    outcomes: list[str] = []

    def enrol() -> None:
        try:
            barrier.wait()
            enrollment_token_use(token=EnrollmentToken.objects.get(pk=token.pk), instance_uid=uuid7())
            outcomes.append("enrolled")
        except EnrollmentTokenRefused as error:
            outcomes.append(error.message)
        finally:
            connection.close()

    threads = [threading.Thread(target=enrol) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    token.refresh_from_db()
    assert outcomes.count("enrolled") == 3
    assert outcomes.count(TOKEN_EXHAUSTED) == workers - 3
    assert token.use_count == 3
    assert token.uses.count() == 3
