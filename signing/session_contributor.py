"""Signing's part in the OpAMP session: the CSR flow and certificate offers.

With a CA configured, the server advertises OffersConnectionSettings and
AcceptsConnectionSettingsRequest. A CSR in `connection_settings_request` is submitted
(signing.agent_credentials.certificate_request_from_agent); the agent's newest certificate
goes out as connection settings when this connection does not use it yet, and an agent
whose certificate is in its last third is asked to renew it (a custom message).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings

from fleet.db import db
from fleet.hint_messages import HintKind
from fleet.protocol_errors import ProtocolError
from fleet.services import AgentSnapshot
from fleet.session_contributor import ReplyFiller, ReplyPart, ReportStep, SessionContributor
from opamp.capabilities import AgentCapabilities, ServerCapabilities, has_capability
from opamp.proto import opamp_pb2
from signing.agent_credentials import (
    CERTIFICATE_CAPABILITY,
    RENEW_MESSAGE_TYPE,
    ca_configured,
    certificate_offer_for,
    certificate_request_from_agent,
    fill_certificate_offer,
)
from signing.ca import CsrRejected
from signing.errors import SigningError

if TYPE_CHECKING:
    from fleet.session import AgentSession
    from fleet.session_runtime import FleetRuntime

logger = logging.getLogger(__name__)

# With a certificate authority configured: the CSR flow and certificate offers.
CERTIFICATE_CAPABILITIES = int(
    ServerCapabilities.OFFERS_CONNECTION_SETTINGS | ServerCapabilities.ACCEPTS_CONNECTION_SETTINGS_REQUEST
)


@dataclass
class CertificateConnection:
    """What a connection remembers of its certificate offers."""

    # Look for a certificate to offer on the first message, after a CSR and on hints.
    check_due: bool = True
    offered_settings_hash: bytes = b""


class CertificateContributor(SessionContributor):
    name = "signing"
    hint_kinds = (HintKind.CERTIFICATE,)

    def __init__(self, runtime: FleetRuntime) -> None:
        # The last connection-settings hash each agent reported (applied or failed), so
        # an offer is not repeated to an agent that already answered it.
        self.settings_reported: dict[uuid.UUID, bytes] = {}
        # Certificates (by fingerprint) whose renewal this process already asked for.
        self.renewal_asked: set[str] = set()

    def conditional_capabilities(self) -> int:
        return CERTIFICATE_CAPABILITIES if ca_configured() else 0

    def report_steps(self) -> Sequence[tuple[str, ReportStep]]:
        return (
            ("connection_settings_status", self.note_connection_settings_status),
            ("connection_settings_request", self.submit_csr),
        )

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return (
            (ReplyPart.CONNECTION_SETTINGS, self.offer_certificate),
            (ReplyPart.CUSTOM_MESSAGE, self.ask_for_renewal),
        )

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        self._check_again(session)  # a certificate was issued

    def _check_again(self, session: AgentSession) -> None:
        connection: CertificateConnection | None = session.remembered(self)
        if connection is not None:
            connection.check_due = True

    async def note_connection_settings_status(
        self, session: AgentSession, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot
    ) -> None:
        status = message.connection_settings_status
        if status.last_connection_settings_hash:
            self.settings_reported[snapshot.instance_uid] = bytes(status.last_connection_settings_hash)
        if status.status == opamp_pb2.ConnectionSettingsStatuses_FAILED:
            logger.warning(
                "agent %s could not apply connection settings: %s", snapshot.instance_uid, status.error_message
            )

    async def submit_csr(
        self, session: AgentSession, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot
    ) -> None:
        csr = message.connection_settings_request.opamp.certificate_request.csr
        if not csr:
            return
        instance_uid = snapshot.instance_uid
        try:
            request = await db(certificate_request_from_agent)(session.credential, instance_uid, csr)
        except CsrRejected as error:
            logger.info("refused a CSR from %s (%s): %s", instance_uid, session.remote_address, error.message)
            raise ProtocolError(error.message) from None
        except SigningError as error:
            raise ProtocolError(error.message) from None
        logger.info("CSR from %s is %s (request %s)", instance_uid, request.state, request.pk)
        self._check_again(session)

    async def offer_certificate(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        """Offer the agent's newest certificate when this connection does not use it yet.

        Checked on a connection's first message, after a CSR and on hints (issuance sends
        one), not on every heartbeat. Never repeated for a hash the agent already answered.
        """
        connection: CertificateConnection | None = session.remembered(self)
        if (connection is not None and not connection.check_due) or not has_capability(
            snapshot.capabilities, AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
        ):
            return False
        if connection is None:
            connection = CertificateConnection()
            session.remember(self, connection)
        connection.check_due = False
        offer = await db(certificate_offer_for)(snapshot.instance_uid, session.credential)
        if offer is None:
            return False
        offers = opamp_pb2.ConnectionSettingsOffers()
        digest = fill_certificate_offer(
            offers,
            offer,
            endpoint=session.endpoint or "/v1/opamp",
            heartbeat_seconds=int(settings.OPAMP_HEARTBEAT_INTERVAL_SECONDS),
        )
        # The agent reports the hash of the whole offer, which may have held other parts
        # beside the certificate (telemetry destinations), and only its last one: the
        # fleet's ledger knows which certificate offers it answered.
        if digest in (
            connection.offered_settings_hash,
            self.settings_reported.get(snapshot.instance_uid),
        ) or session.fleet.settings_offers.answered(snapshot.instance_uid, digest):
            return False
        # Added to the offer beside the other parts; the fleet hashes the whole offer once
        # every part is in (fleet.connection_settings_offers).
        reply.connection_settings.opamp.MergeFrom(offers.opamp)
        session.fleet.settings_offers.adding(session, digest)
        connection.offered_settings_hash = digest
        return True

    async def ask_for_renewal(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        """Ask an agent whose certificate has a third of its validity left for a new CSR.

        Over the custom capability the project defines for it, once per certificate and
        process; agents that renew on their own schedule simply send the CSR first. Only in
        answer to a message (`now`), never in a push.
        """
        credential = session.credential
        if now is None or credential.renew_after is None or now < credential.renew_after:
            return False
        if CERTIFICATE_CAPABILITY not in snapshot.custom_capabilities or reply.HasField("custom_message"):
            return False
        if credential.fingerprint_sha256 in self.renewal_asked:
            return False
        self.renewal_asked.add(credential.fingerprint_sha256)
        reply.custom_message.capability = CERTIFICATE_CAPABILITY
        reply.custom_message.type = RENEW_MESSAGE_TYPE
        return True
