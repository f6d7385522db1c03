"""The agent's side of certificate enrollment within its sessions.

Given a `CredentialStore` the agent enrolls for a TLS client certificate and keeps it
renewed: `CertificateHandling` chooses what each connection presents (token, certificate),
sends a certificate request when one is due (on a reply, and on the renewal check), and
follows the server's answers: its capabilities, a refused request, a renewal request, an
offered certificate. Installing a certificate ends the session with `Reconnect`, so the
next connection presents it. The enrollment state itself (keys, pending request, status)
is `agent_client.enrollment.Enrollment`.
"""

from __future__ import annotations

import asyncio

from agent_client.agent_base import AgentBase
from agent_client.enrollment import CUSTOM_CAPABILITY as CERTIFICATE_CAPABILITY
from agent_client.enrollment import RENEW_MESSAGE_TYPE, Enrollment, EnrollmentEvent, OfferKind
from opamp.capabilities import ServerCapabilities
from opamp.proto import opamp_pb2 as pb


class Reconnect(Exception):
    """Ends a session so that the next one starts at once (new credentials to present)."""


class CertificateHandling(AgentBase):
    """Certificate enrollment for `agent_client.agent.Agent`; inert without a CredentialStore."""

    def _notify_enrollment(self, event: EnrollmentEvent, detail: str) -> None:
        """Tell the observer that enrollment made progress or failed (the Agent does)."""
        raise NotImplementedError

    def _credential_hint(self) -> str:
        if self._enrollment is None:
            return "check the credential headers"
        headers, certificate = self._enrollment.connection_credentials(self._instance_uid, secure=self.transport.secure)
        presented = [
            *(["the enrollment token"] if headers else []),
            *(["the client certificate"] if certificate is not None else []),
        ]
        return f"presented {' and '.join(presented) or 'no credential'}"

    def _prepare_connection(self) -> None:
        if self._enrollment is None:
            return
        self._enrollment.new_connection()
        headers, certificate = self._enrollment.connection_credentials(self._instance_uid, secure=self.transport.secure)
        self._presented_certificate = certificate is not None
        self.transport.set_credentials(headers, certificate)

    def _note_server_capabilities(self, enrollment: Enrollment, capabilities: int) -> None:
        accepts = bool(capabilities & ServerCapabilities.ACCEPTS_CONNECTION_SETTINGS_REQUEST)
        first_word = not enrollment.server_capabilities_seen
        enrollment.server_capabilities_seen = True
        enrollment.server_accepts_requests = accepts
        if not accepts and first_word and (reason := enrollment.request_reason(self._instance_uid)):
            detail = f"the server does not accept certificate requests (needed: {reason})"
            self._log.warning("%s", detail)
            self._notify_enrollment(EnrollmentEvent.CSR_NOT_ACCEPTED, detail)

    def _on_custom_message(self, enrollment: Enrollment, message: pb.CustomMessage) -> None:
        if message.capability != CERTIFICATE_CAPABILITY:
            return
        if message.type != RENEW_MESSAGE_TYPE:
            self._log.info("ignoring %s message of unknown type %r", CERTIFICATE_CAPABILITY, message.type[:64])
            return
        self._log.info("the server asked for a certificate renewal")
        enrollment.renew_requested = True

    async def _request_certificate_if_due(self) -> None:
        enrollment = self._enrollment
        if enrollment is None or not enrollment.may_request():
            return
        async with self._enrollment_lock:
            prepared = await asyncio.to_thread(enrollment.prepare_request, self._instance_uid)
        if prepared is None:
            return
        pending, reason = prepared
        await self._send_report(csr=pending.csr_pem)
        detail = f"certificate request sent ({reason}; public key sha256 {pending.fingerprint[:16]})"
        self._log.info("%s; waiting for the server's answer", detail)
        self._notify_enrollment(EnrollmentEvent.CSR_SENT, detail)

    async def _on_request_refused(self, message: str) -> None:
        enrollment = self._enrollment
        assert enrollment is not None
        async with self._enrollment_lock:
            _, delay = await asyncio.to_thread(enrollment.request_refused, message)
        detail = f"the server refused the certificate request: {message}"
        self._log.warning("%s; a new request follows on a later connection, not before %.0f s", detail, delay)
        self._notify_enrollment(EnrollmentEvent.CSR_REFUSED, detail)
        await self._send_report(connection_settings_status=True)

    async def _on_connection_settings(self, offers: pb.ConnectionSettingsOffers) -> None:
        enrollment = self._enrollment
        assert enrollment is not None
        async with self._enrollment_lock:
            outcome = await asyncio.to_thread(enrollment.receive_offer, offers, self._instance_uid)
        settings = offers.opamp
        if outcome.kind is OfferKind.REFUSED:
            detail = f"refused the offered certificate: {outcome.status.error_message}"
            self._log.warning("%s", detail)
            self._notify_enrollment(EnrollmentEvent.CERTIFICATE_REFUSED, detail)
            await self._send_report(connection_settings_status=True)
            return
        if outcome.kind is OfferKind.REPEATED and outcome.status.status != pb.ConnectionSettingsStatuses_APPLIED:
            return
        # An offer that carries a certificate sets the interval only when it names one; any
        # other offer follows the protocol, where 0 disables heartbeats. A repeated offer is
        # adopted again: the interval is not persisted, the status is.
        seconds = settings.heartbeat_interval_seconds
        if seconds or not settings.certificate.cert:
            self._adopt_heartbeat(seconds)
        if outcome.kind is OfferKind.REPEATED:
            return
        if settings.destination_endpoint and settings.destination_endpoint != self.transport.url:
            self._log.info(
                "the server names the endpoint %s; staying with the configured %s",
                settings.destination_endpoint[:256],
                self.transport.url,
            )
        if outcome.kind is OfferKind.SETTINGS:
            if offers.hash:
                await self._send_report(connection_settings_status=True)
            return
        assert outcome.credentials is not None
        detail = f"certificate installed: {outcome.credentials.describe()}"
        self._log.info("%s", detail)
        await self._send_report(connection_settings_status=True)
        self._notify_enrollment(EnrollmentEvent.CERTIFICATE_APPLIED, detail)
        raise Reconnect

    async def _renewal_loop(self) -> None:
        assert self._enrollment is not None
        while True:
            await asyncio.sleep(self._enrollment.settings.renewal_check_interval)
            await self._request_certificate_if_due()
