"""Certificate enrollment and rotation: what the agent decides, apart from how it talks.

An agent with a `CredentialStore` enrolls: it declares AcceptsOpAMPConnectionSettings,
ReportsConnectionSettingsStatus and the custom capability `io.opamp.certificate/v1`, and:

- connects with the enrollment token (`Authorization: Bearer ...`) while it holds no usable
  certificate, and with its certificate as the TLS client certificate once it does (the
  token then stays at home unless `send_token_with_certificate`);
- sends a CSR once per connection, after a reply advertised AcceptsConnectionSettingsRequest,
  when it has no usable certificate, when less than a third of the certificate's validity
  is left, or when the server sent the custom message `renew`. The key of an unanswered
  CSR is kept (`pending.key`) and the same CSR is sent again on later connections;
- treats a BadRequest error_response while its CSR is unanswered as the CSR's refusal:
  reports FAILED with the server's reason, drops that key and makes a fresh CSR only on a
  later connection, after a backoff that grows with every refusal;
- checks an offered certificate (`credentials.check_offered_certificate`), installs it and
  reports APPLIED with the offer's hash, or reports FAILED with the reason and keeps what it
  had. After an install the agent reconnects so that the new certificate is presented.

`destination_endpoint` in an offer is only logged: the agent keeps the server URL it was
configured with (and the CA it verifies that server with); an offer cannot redirect it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent_client.backoff import Backoff
from agent_client.credentials import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    CertificateRefused,
    Credentials,
    CredentialStore,
    PendingRequest,
    SettingsStatus,
    build_csr,
    check_offered_certificate,
    generate_key,
)
from agent_client.transport import ClientCertificate
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb

CUSTOM_CAPABILITY = "io.opamp.certificate/v1"
RENEW_MESSAGE_TYPE = "renew"
TOKEN_PREFIX = "opamp_et_"
CAPABILITIES = (
    AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS | AgentCapabilities.REPORTS_CONNECTION_SETTINGS_STATUS
)

# Why a certificate request is due.
NO_CERTIFICATE = "no certificate yet"
OTHER_IDENTITY = "the certificate names another instance uid"
NOT_VALID_NOW = "the certificate is not valid now"
RENEWAL_DUE = "renewal due: less than a third of the certificate's validity is left"
SERVER_ASKED = "the server asked for a renewal"
CERTIFICATE_REFUSED = "the server refused the certificate"


class EnrollmentEvent(Enum):
    """What `AgentObserver.on_enrollment` is told about."""

    CSR_SENT = "csr_sent"
    CSR_REFUSED = "csr_refused"
    CSR_NOT_ACCEPTED = "csr_not_accepted"
    CERTIFICATE_APPLIED = "certificate_applied"
    CERTIFICATE_REFUSED = "certificate_refused"


@dataclass(frozen=True)
class EnrollmentSettings:
    """How an enrolling agent authenticates and requests certificates."""

    # The enrollment token's secret; never shown in a repr or a log line.
    token: str | None = field(default=None, repr=False)
    send_token_with_certificate: bool = False
    key_type: str = DEFAULT_KEY_TYPE
    csr_san: bool = True
    # How often a connected agent checks whether its certificate is due for renewal.
    renewal_check_interval: float = 60.0
    # After a refused CSR, the next one waits at least this long, doubling up to the maximum.
    csr_retry_initial: float = 30.0
    csr_retry_max: float = 3600.0

    def __post_init__(self) -> None:
        if self.key_type not in KEY_TYPES:
            raise ValueError(f"unsupported key type {self.key_type!r}; choose one of {', '.join(KEY_TYPES)}")
        if self.renewal_check_interval <= 0:
            raise ValueError("renewal_check_interval must be positive")
        if self.csr_retry_initial <= 0 or self.csr_retry_max < self.csr_retry_initial:
            raise ValueError("CSR retries need 0 < csr_retry_initial <= csr_retry_max")


class OfferKind(Enum):
    INSTALLED = "installed"  # a new certificate is in use: reconnect
    REFUSED = "refused"  # FAILED reported, old credentials kept
    SETTINGS = "settings"  # no (new) certificate: other settings applied
    REPEATED = "repeated"  # the hash the agent already answered


@dataclass(frozen=True)
class OfferOutcome:
    kind: OfferKind
    status: SettingsStatus
    credentials: Credentials | None = None


class Enrollment:
    """The enrollment state of one agent. Methods that touch files are synchronous: the
    agent runs them in a thread, one at a time."""

    def __init__(self, store: CredentialStore, settings: EnrollmentSettings, *, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.credentials = store.load_credentials()
        self.pending = store.load_pending()
        self.status = store.load_status()
        self._retry = Backoff(initial=settings.csr_retry_initial, maximum=settings.csr_retry_max)
        self.retry_at: datetime | None = None
        self.renew_requested = False
        # The last connection that presented the certificate was refused (revoked, or a
        # CA the server no longer trusts): with a token, the next ones present the token
        # and enroll again.
        self.certificate_refused = False
        # Per connection.
        self.server_capabilities_seen = False
        self.server_accepts_requests = False
        self.request_sent = False
        self.awaiting_answer = False

    def new_connection(self) -> None:
        self.server_capabilities_seen = False
        self.server_accepts_requests = False
        self.request_sent = False
        self.awaiting_answer = False

    # -- credentials -----------------------------------------------------------------

    def usable_credentials(self, instance_uid: bytes) -> Credentials | None:
        """The certificate to present now, if it is valid and names this agent."""
        credentials = self.credentials
        if credentials is None or self.certificate_refused:
            return None
        if not credentials.names(instance_uid) or not credentials.valid_at(self.clock()):
            return None
        return credentials

    def connection_refused(self, *, presented_certificate: bool) -> bool:
        """The server refused a connection's credential: True when the next connection
        presents another one.

        A refused certificate is set aside for the enrollment token, which gets a new
        certificate through the CSR flow. A refused token brings the certificate back:
        the certificate's refusal may have been passing (a CRL being replaced) while the
        token may since have expired, so the agent alternates rather than give up on either.
        """
        if not self.settings.token or self.credentials is None:
            return False
        self.certificate_refused = presented_certificate
        return True

    def connection_credentials(
        self, instance_uid: bytes, *, secure: bool
    ) -> tuple[dict[str, str], ClientCertificate | None]:
        """Headers and client certificate for the next connection.

        Over a connection without TLS no certificate can be presented, so the token is sent
        even when a certificate is held.
        """
        credentials = self.usable_credentials(instance_uid) if secure else None
        headers = {}
        if self.settings.token and (credentials is None or self.settings.send_token_with_certificate):
            headers["Authorization"] = f"Bearer {self.settings.token}"
        if credentials is None:
            return headers, None
        return headers, ClientCertificate(cert_file=credentials.cert_file, key_file=credentials.key_file)

    def request_reason(self, instance_uid: bytes) -> str | None:
        """Why the agent needs a (new) certificate, or None when it does not."""
        if self.renew_requested:
            return SERVER_ASKED
        if self.certificate_refused:
            return CERTIFICATE_REFUSED
        credentials = self.credentials
        if credentials is None:
            return NO_CERTIFICATE
        if not credentials.names(instance_uid):
            return OTHER_IDENTITY
        now = self.clock()
        if not credentials.valid_at(now):
            return NOT_VALID_NOW
        if credentials.renewal_due(now):
            return RENEWAL_DUE
        return None

    # -- requests --------------------------------------------------------------------

    def may_request(self) -> bool:
        """False when `prepare_request` would certainly return None (cheap; no files)."""
        return self.server_accepts_requests and (self.renew_requested or not self.request_sent)

    def prepare_request(self, instance_uid: bytes) -> tuple[PendingRequest, str] | None:
        """The CSR to send on this connection now, with the reason, or None.

        At most one per connection (a server `renew` excepted), only once the server said it
        accepts requests, and not before the backoff after a refusal has passed. A pending
        request for this uid is re-sent as it is; otherwise a new key and CSR are made and
        stored before anything is sent.
        """
        if not self.server_accepts_requests:
            return None
        reason = self.request_reason(instance_uid)
        if reason is None:
            return None
        forced = self.renew_requested
        if self.request_sent and not forced:
            return None
        if not forced and self.retry_at is not None and self.clock() < self.retry_at:
            return None
        pending = self.pending
        if forced or pending is None or not pending.names(instance_uid):
            key = generate_key(self.settings.key_type)
            pending = PendingRequest(key=key, csr_pem=build_csr(key, instance_uid, san=self.settings.csr_san))
            self.store.save_pending(pending)
            self.pending = pending
        self.renew_requested = False
        self.request_sent = True
        self.awaiting_answer = True
        return pending, reason

    def request_refused(self, message: str) -> tuple[SettingsStatus, float]:
        """The unanswered CSR was refused: FAILED, a fresh key next time, after a backoff."""
        delay = self._retry.next_delay(at_least=self.settings.csr_retry_initial)
        self.retry_at = self.clock() + timedelta(seconds=delay)
        self.awaiting_answer = False
        self.pending = None
        self.store.discard_pending()
        return self._record(SettingsStatus(status=pb.ConnectionSettingsStatuses_FAILED, error_message=message)), delay

    # -- offers ----------------------------------------------------------------------

    def receive_offer(self, offers: pb.ConnectionSettingsOffers, instance_uid: bytes) -> OfferOutcome:
        """Check and apply the OpAMP connection settings of `offers` (see the module doc)."""
        if offers.hash and offers.hash == self.status.last_hash:
            return OfferOutcome(OfferKind.REPEATED, self.status)
        certificate = offers.opamp.certificate
        if not certificate.cert or self._is_current(certificate.cert):
            if not offers.hash:
                return OfferOutcome(OfferKind.SETTINGS, self.status)
            status = SettingsStatus(last_hash=offers.hash, status=pb.ConnectionSettingsStatuses_APPLIED)
            return OfferOutcome(OfferKind.SETTINGS, self._record(status))
        pending = self.pending
        try:
            cert, ca_cert = check_offered_certificate(
                cert_pem=certificate.cert,
                ca_pem=certificate.ca_cert,
                key=pending.key if pending is not None else None,
                instance_uid=instance_uid,
                now=self.clock(),
                stored_ca=self.credentials.ca_cert if self.credentials is not None else None,
            )
        except CertificateRefused as error:
            self.awaiting_answer = False
            status = SettingsStatus(
                last_hash=offers.hash, status=pb.ConnectionSettingsStatuses_FAILED, error_message=str(error)
            )
            return OfferOutcome(OfferKind.REFUSED, self._record(status))
        assert pending is not None  # check_offered_certificate refuses an offer without a key
        self.credentials = self.store.install(cert=cert, ca_cert=ca_cert, pending=pending)
        self.certificate_refused = False
        self.pending = None
        self.awaiting_answer = False
        self.retry_at = None
        self._retry.reset()
        status = SettingsStatus(last_hash=offers.hash, status=pb.ConnectionSettingsStatuses_APPLIED)
        return OfferOutcome(OfferKind.INSTALLED, self._record(status), self.credentials)

    def _is_current(self, cert_pem: bytes) -> bool:
        if self.credentials is None:
            return False
        try:
            offered = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return False
        current = self.credentials.cert.public_bytes(serialization.Encoding.DER)
        return offered.public_bytes(serialization.Encoding.DER) == current

    def _record(self, status: SettingsStatus) -> SettingsStatus:
        self.status = status
        self.store.save_status(status)
        return status
