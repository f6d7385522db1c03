"""A certificate offer and telemetry connection settings share one ConnectionSettingsOffers:
one hash over the whole message, and neither part offered again once it is answered."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async as sync_to_async

from fleet.connection_settings import telemetry_settings_create
from fleet.session_runtime import reset_runtime
from fleet.telemetry_settings import offers_hash
from opamp.capabilities import AgentCapabilities
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from signing.certificates import certificate_request_approve
from signing.models import CertificateRequest
from tests.fleet.asgi_clients import http_exchange
from tests.fleet.messages import BASE_CAPABILITIES, heartbeat
from tests.signing.csrs import make_csr

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

CAPABLE = int(
    BASE_CAPABILITIES | AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS | AgentCapabilities.REPORTS_OWN_METRICS
)
METRICS = {"destination_endpoint": "https://otlp.example/v1/metrics"}


@pytest.fixture(autouse=True)
def fresh_runtime() -> Any:
    reset_runtime()
    yield
    reset_runtime()


def csr_message(uid: bytes, seq: int, csr: bytes) -> opamp_pb2.AgentToServer:
    message = heartbeat(uid, seq, capabilities=CAPABLE)
    message.connection_settings_request.opamp.certificate_request.csr = csr
    return message


async def test_the_certificate_and_the_telemetry_settings_go_in_one_offer_with_one_hash(configured_ca, operator):
    await sync_to_async(telemetry_settings_create)(
        name="all", actor=None, selector={}, own_metrics=METRICS, heartbeat_interval_seconds=20
    )
    uid = uuid7()
    first = await http_exchange(csr_message(uid.bytes, 1, make_csr("p256")))
    # The telemetry part alone first (no certificate issued yet): the heartbeat interval too.
    assert first.connection_settings.own_metrics.destination_endpoint == METRICS["destination_endpoint"]
    assert first.connection_settings.opamp.heartbeat_interval_seconds == 20
    assert not first.connection_settings.opamp.HasField("certificate")
    request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=uid)
    await sync_to_async(certificate_request_approve)(request=request, actor=operator)

    reset_runtime()  # a process that never offered the telemetry part: both parts together
    poll = await http_exchange(heartbeat(uid.bytes, 2, capabilities=CAPABLE))
    offers = poll.connection_settings
    assert offers.opamp.certificate.cert and offers.own_metrics.destination_endpoint
    # The operator's heartbeat interval, not the default a certificate offer carries.
    assert offers.opamp.heartbeat_interval_seconds == 20
    assert offers.hash == offers_hash(offers)

    answer = heartbeat(uid.bytes, 3, capabilities=CAPABLE)
    answer.connection_settings_status.last_connection_settings_hash = offers.hash
    answer.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_APPLIED
    assert not (await http_exchange(answer)).HasField("connection_settings")
    for seq in (4, 5):
        quiet = await http_exchange(heartbeat(uid.bytes, seq, capabilities=CAPABLE))
        assert not quiet.HasField("connection_settings")


async def test_a_certificate_offer_alone_is_not_repeated_after_a_restart(configured_ca, operator):
    uid = uuid7()
    await http_exchange(csr_message(uid.bytes, 1, make_csr("p256")))
    request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=uid)
    await sync_to_async(certificate_request_approve)(request=request, actor=operator)
    offers = (await http_exchange(heartbeat(uid.bytes, 2, capabilities=CAPABLE))).connection_settings
    assert offers.opamp.certificate.cert and not offers.HasField("own_metrics")
    assert offers.hash == offers_hash(offers)
    reset_runtime()  # the ledger of merged offers is gone; the hash alone names the certificate
    answer = heartbeat(uid.bytes, 3, capabilities=CAPABLE)
    answer.connection_settings_status.last_connection_settings_hash = offers.hash
    answer.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_APPLIED
    assert not (await http_exchange(answer)).HasField("connection_settings")


async def test_an_agent_holding_both_parts_from_separate_offers_is_offered_neither_again(configured_ca, operator):
    # The agent reports only its last offer's hash: the settings' first, then the
    # certificate's. Neither part may be offered again (over HTTP each poll would).
    await sync_to_async(telemetry_settings_create)(
        name="all", actor=None, selector={}, own_metrics=METRICS, heartbeat_interval_seconds=20
    )
    uid = uuid7()
    settings_offer = (await http_exchange(csr_message(uid.bytes, 1, make_csr("p256")))).connection_settings
    assert settings_offer.own_metrics.destination_endpoint and not settings_offer.opamp.certificate.cert
    applied = heartbeat(uid.bytes, 2, capabilities=CAPABLE)
    applied.connection_settings_status.last_connection_settings_hash = settings_offer.hash
    applied.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_APPLIED
    assert not (await http_exchange(applied)).HasField("connection_settings")

    request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=uid)
    await sync_to_async(certificate_request_approve)(request=request, actor=operator)
    certificate_offer = (await http_exchange(heartbeat(uid.bytes, 3, capabilities=CAPABLE))).connection_settings
    assert certificate_offer.opamp.certificate.cert and not certificate_offer.HasField("own_metrics")
    assert certificate_offer.opamp.heartbeat_interval_seconds == 20
    applied = heartbeat(uid.bytes, 4, capabilities=CAPABLE)
    applied.connection_settings_status.last_connection_settings_hash = certificate_offer.hash
    applied.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_APPLIED
    assert not (await http_exchange(applied)).HasField("connection_settings")
    for seq in range(5, 9):
        assert not (await http_exchange(heartbeat(uid.bytes, seq, capabilities=CAPABLE))).HasField(
            "connection_settings"
        )
