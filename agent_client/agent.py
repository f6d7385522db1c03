"""The OpAMP agent: one asyncio task that keeps a session with the server going.

A session opens with a full status report. After that the agent heartbeats every
`heartbeat_interval` seconds with only instance_uid, sequence_num and capabilities
(absent sub-messages mean "unchanged") and acts on what the server sends: ReportFullState,
a new instance_uid, a heartbeat interval, a remote config. A transport failure or an
UNAVAILABLE answer ends the session; the agent reconnects after a jittered backoff and opens
the next session with a full report again, since it cannot know which of its messages the
server processed. `stop()` ends the current session with `agent_disconnect`.

Given a `CredentialStore` the agent also enrolls for a TLS client certificate and keeps it
renewed (`agent_client.enrollment`); installing a certificate ends the session with
`agent_disconnect` and reconnects at once so the new certificate is presented. A server that
refuses the credential (401/403) is retried no sooner than `refused_credential_delay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client import report
from agent_client.backoff import Backoff
from agent_client.credentials import CredentialStore
from agent_client.enrollment import CAPABILITIES as ENROLLMENT_CAPABILITIES
from agent_client.enrollment import CUSTOM_CAPABILITY as CERTIFICATE_CAPABILITY
from agent_client.enrollment import (
    RENEW_MESSAGE_TYPE,
    Enrollment,
    EnrollmentEvent,
    EnrollmentSettings,
    OfferKind,
)
from agent_client.remote_config import ConfigFile, ConfigRejected, check_remote_config
from agent_client.signed_config import content_hash, record_signing, verify_remote_config
from agent_client.state import AgentState, RemoteConfigRecord
from agent_client.transport import CredentialRefused, Transport, TransportError
from agent_client.version import __version__
from opamp.capabilities import AgentCapabilities, ServerCapabilities, ServerToAgentFlags
from opamp.config_signature import CUSTOM_CAPABILITY, key_id_for
from opamp.hashing import config_map_hash
from opamp.identifiers import instance_uid_problem, new_instance_uid
from opamp.proto import opamp_pb2 as pb

logger = logging.getLogger("agent_client")

DEFAULT_SERVICE_NAME = "opamp-agent-client"
DEFAULT_HEARTBEAT_INTERVAL = 30.0

SERVICE_NAME = "service.name"
SERVICE_INSTANCE_ID = "service.instance.id"
SERVICE_VERSION = "service.version"
HOST_NAME = "host.name"
OS_TYPE = "os.type"

_ALWAYS_DECLARED = (
    AgentCapabilities.REPORTS_STATUS
    | AgentCapabilities.REPORTS_EFFECTIVE_CONFIG
    | AgentCapabilities.REPORTS_HEALTH
    | AgentCapabilities.REPORTS_REMOTE_CONFIG
    | AgentCapabilities.REPORTS_HEARTBEAT
)
# Send times kept for pairing replies with requests; a server that stops answering
# must not make the queue grow without bound.
_MAX_UNANSWERED = 1024


class _Reconnect(Exception):
    """Ends a session so that the next one starts at once (new credentials to present)."""


@dataclass(frozen=True)
class AgentSettings:
    """How an agent describes itself and behaves; shared freely between simulated agents."""

    identifying_attributes: Mapping[str, str] = field(default_factory=dict)
    non_identifying_attributes: Mapping[str, str] = field(default_factory=dict)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    accept_remote_config: bool = True
    fail_if_contains: bytes | None = None
    fail_apply: bool = False
    # Drill: seconds an apply takes (the agent reports APPLYING meanwhile), as a real
    # collector restart would.
    apply_delay: float = 0.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    shutdown_timeout: float = 5.0
    # Key id -> Ed25519 public key. None: signatures are not required. Otherwise the agent
    # declares the signed-config custom capability and applies only configs signed by one
    # of these keys (an empty mapping refuses every config).
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None
    # Used only by agents given a CredentialStore (certificate enrollment).
    enrollment: EnrollmentSettings = field(default_factory=EnrollmentSettings)
    # A refused credential (401/403) does not fix itself in a second: retry no sooner.
    refused_credential_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.refused_credential_delay < 0:
            raise ValueError("refused_credential_delay must not be negative")
        if self.apply_delay < 0:
            raise ValueError("apply_delay must not be negative")
        for key_id, key in (self.trusted_keys or {}).items():
            if key_id != key_id_for(key):
                raise ValueError(f"trusted key {key_id!r} is filed under the wrong id (its id is {key_id_for(key)})")

    @property
    def requires_signed_config(self) -> bool:
        return self.trusted_keys is not None

    @property
    def custom_capabilities(self) -> list[str]:
        """The custom capabilities declared in full reports."""
        return [CUSTOM_CAPABILITY] if self.requires_signed_config else []

    @property
    def capabilities(self) -> int:
        bits = _ALWAYS_DECLARED
        if self.accept_remote_config:
            bits |= AgentCapabilities.ACCEPTS_REMOTE_CONFIG
        return int(bits)


class AgentObserver:
    """Hooks for measuring agents (the fleet simulator's statistics). All are optional."""

    def on_connected(self, agent: Agent) -> None:
        """A session opened; its full report is about to be sent."""

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        """A ServerToAgent arrived.

        `round_trip` pairs replies with sends in order, which is exact for a server that
        answers every message once; a server push shifts the pairing.
        """

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        """A session ended with `error`; the next attempt starts in `retry_in` seconds."""

    def on_enrollment(self, agent: Agent, event: EnrollmentEvent, detail: str) -> None:
        """Certificate enrollment made progress or failed; `detail` is a human-readable line."""


class _PrefixedLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the agent's name, so a simulated fleet's logs can be read."""

    def __init__(self, base: logging.Logger, prefix: str) -> None:
        super().__init__(base, {})
        self.prefix = prefix

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return (f"{self.prefix}{msg}" if self.prefix else msg), kwargs


@functools.cache
def _host_attributes() -> dict[str, str]:
    return {HOST_NAME: socket.gethostname(), OS_TYPE: platform.system().lower()}


class Agent:
    """An OpAMP agent. `await agent.run()` until `agent.stop()`."""

    def __init__(
        self,
        *,
        transport: Transport,
        state: AgentState,
        settings: AgentSettings | None = None,
        observer: AgentObserver | None = None,
        name: str | None = None,
        credentials: CredentialStore | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """`credentials` turns certificate enrollment on (keys and certificates live there);
        `clock` (aware datetimes) decides certificate validity and renewal, for tests."""
        self.transport = transport
        self.settings = settings or AgentSettings()
        self.name = name
        self._state = state
        self._observer = observer or AgentObserver()
        self._log = _PrefixedLog(logger, f"[{name}] " if name else "")

        instance_uid = state.load_instance_uid()
        if instance_uid is None:
            instance_uid = new_instance_uid()
            state.save_instance_uid(instance_uid)
        self._instance_uid = instance_uid
        self._remote = state.load_remote_config()
        self._start_time_unix_nano = time.time_ns()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._enrollment = (
            Enrollment(credentials, self.settings.enrollment, clock=self._clock) if credentials is not None else None
        )
        # Enrollment steps write files in a thread; one at a time.
        self._enrollment_lock = asyncio.Lock()
        self._presented_certificate = False  # by the current (or last) connection

        self._backoff = Backoff(initial=self.settings.backoff_initial, maximum=self.settings.backoff_max)
        self._sequence_num = 0
        self._server_heartbeat_seconds: int | None = None
        self._full_report_due = True
        self._last_send = 0.0
        self._sent_at: deque[float] = deque(maxlen=_MAX_UNANSWERED)
        # One sender at a time: sequence numbers must reach the wire in order.
        self._send_lock = asyncio.Lock()
        self._heartbeat_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self.connected = False

    # -- what the agent currently is -------------------------------------------------

    @property
    def instance_uid(self) -> bytes:
        return self._instance_uid

    @property
    def capabilities(self) -> int:
        if self._enrollment is not None:
            return self.settings.capabilities | int(ENROLLMENT_CAPABILITIES)
        return self.settings.capabilities

    @property
    def custom_capabilities(self) -> list[str]:
        custom = self.settings.custom_capabilities
        if self._enrollment is not None:
            custom = [*custom, CERTIFICATE_CAPABILITY]
        return custom

    @property
    def enrollment(self) -> Enrollment | None:
        """The enrollment state (certificate, pending request, status); None when not enrolling."""
        return self._enrollment

    @property
    def remote_config(self) -> RemoteConfigRecord:
        return self._remote

    @property
    def sequence_num(self) -> int:
        """The sequence number of the last message sent (0 before the first)."""
        return self._sequence_num

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between heartbeats, the server's offer first; None when disabled."""
        offered = self._server_heartbeat_seconds
        if offered is None:
            return self.settings.heartbeat_interval
        if offered > 0:
            return float(offered)
        # 0 disables heartbeats, but a polling agent hears the server only when it polls.
        return self.settings.heartbeat_interval if self.transport.polls else None

    def identifying_attributes(self) -> dict[str, str]:
        return {
            SERVICE_NAME: DEFAULT_SERVICE_NAME,
            SERVICE_INSTANCE_ID: str(uuid.UUID(bytes=self._instance_uid)),
            SERVICE_VERSION: __version__,
            **self.settings.identifying_attributes,
        }

    def non_identifying_attributes(self) -> dict[str, str]:
        return {**_host_attributes(), **self.settings.non_identifying_attributes}

    # -- life cycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to send agent_disconnect, close the connection and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Keep a session with the server until `stop()`."""
        while not self._stopping.is_set():
            try:
                await self._session()
                return
            except _Reconnect:
                await self._disconnect()
                self._backoff.reset()
                self._log.info("reconnecting to present the new client certificate")
                continue
            except CredentialRefused as error:
                failure: Exception = error
                retry_after: float | None = self.settings.refused_credential_delay
                presented = self._credential_hint()  # before the next credential is chosen
                if self._enrollment is not None and self._enrollment.connection_refused(
                    presented_certificate=self._presented_certificate
                ):
                    retry_after = None  # another credential next: no reason to wait longer
                    self._log.warning(
                        "the server refused the %s; presenting the %s next",
                        *(
                            ("client certificate", "enrollment token")
                            if self._presented_certificate
                            else ("enrollment token", "client certificate")
                        ),
                    )
            except TransportError as error:
                failure = error
                retry_after = error.retry_after
            except Exception as error:
                # An agent outlives its own bugs: log the trace, back off, reconnect.
                self._log.exception("session failed unexpectedly")
                failure, retry_after = error, None
            finally:
                self.connected = False
                await self.transport.close()
            if self._stopping.is_set():
                return
            delay = self._backoff.next_delay(at_least=retry_after)
            if isinstance(failure, CredentialRefused):
                self._log.error("%s: %s; retrying in %.2f s", failure, presented, delay)
            else:
                self._log.warning("disconnected: %s; reconnecting in %.2f s", failure, delay)
            self._observer.on_disconnected(self, failure, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

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

    async def _session(self) -> None:
        stop_requested: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        loops: list[asyncio.Future[Any]] = []
        self._prepare_connection()
        try:
            # A connect can take up to its open timeout; a stop must not wait for it.
            if not await self._unless_stopped(self.transport.connect(), stop_requested):
                return
            self.connected = True
            self._sent_at.clear()
            self._full_report_due = True
            self._log.info("connected to %s", self.transport.url)
            self._observer.on_connected(self)
            await self._send_report()

            loops = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._heartbeat_loop())]
            if self._enrollment is not None:
                loops.append(asyncio.ensure_future(self._renewal_loop()))
            done, _ = await asyncio.wait([stop_requested, *loops], return_when=asyncio.FIRST_COMPLETED)
            if stop_requested not in done:
                for task in loops:
                    if task in done:
                        task.result()  # the loops only end by raising
        finally:
            for task in (stop_requested, *loops):
                task.cancel()
            await asyncio.gather(stop_requested, *loops, return_exceptions=True)
        await self._disconnect()

    @staticmethod
    async def _unless_stopped(work: Coroutine[Any, Any, None], stop_requested: asyncio.Future[Any]) -> bool:
        """Run `work` to completion (True) unless a stop comes first (False, `work` cancelled)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        await asyncio.wait([task, stop_requested], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
        task.result()
        return True

    async def _disconnect(self) -> None:
        message = pb.AgentToServer()
        message.agent_disconnect.SetInParent()
        try:
            # A server that stopped answering must not hold up the agent's exit.
            async with asyncio.timeout(self.settings.shutdown_timeout):
                await self._send(message)
                await self.transport.close()
        except (TransportError, TimeoutError) as error:
            self._log.warning("could not say goodbye to the server: %s", str(error) or "timed out")
            return
        self._log.info("sent agent_disconnect and closed the connection")

    # -- sending -----------------------------------------------------------------------

    async def _send(self, message: pb.AgentToServer) -> None:
        async with self._send_lock:
            self._sequence_num += 1
            message.instance_uid = self._instance_uid
            message.sequence_num = self._sequence_num
            message.capabilities = self.capabilities
            sent_at = asyncio.get_running_loop().time()
            self._last_send = sent_at
            self._sent_at.append(sent_at)
            await self.transport.send(message)

    async def _send_report(
        self,
        *,
        remote_config_status: bool = False,
        effective_config: bool = False,
        connection_settings_status: bool = False,
        csr: bytes | None = None,
    ) -> None:
        """Send a status report: the full state when one is due, else only what is asked."""
        message = pb.AgentToServer()
        if self._full_report_due:
            # Cleared before the send: if it fails the session ends, and the next session
            # opens with a full report anyway.
            self._full_report_due = False
            self._fill_full_report(message)
        else:
            if remote_config_status:
                message.remote_config_status.CopyFrom(report.remote_config_status(self._remote))
            if effective_config:
                message.effective_config.CopyFrom(report.effective_config(self._remote.files))
            if connection_settings_status and self._enrollment is not None:
                message.connection_settings_status.CopyFrom(self._enrollment.status.to_proto())
        if csr is not None:
            message.connection_settings_request.opamp.certificate_request.csr = csr
        await self._send(message)

    def _fill_full_report(self, message: pb.AgentToServer) -> None:
        message.agent_description.CopyFrom(
            report.agent_description(self.identifying_attributes(), self.non_identifying_attributes())
        )
        message.health.CopyFrom(report.component_health(start_time_unix_nano=self._start_time_unix_nano))
        message.effective_config.CopyFrom(report.effective_config(self._remote.files))
        message.remote_config_status.CopyFrom(report.remote_config_status(self._remote))
        if custom := self.custom_capabilities:
            message.custom_capabilities.capabilities.extend(custom)
        if self._enrollment is not None and self._enrollment.status.status != pb.ConnectionSettingsStatuses_UNSET:
            message.connection_settings_status.CopyFrom(self._enrollment.status.to_proto())

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._heartbeat_changed.clear()
            interval = self.heartbeat_interval
            if interval is None:
                await self._heartbeat_changed.wait()
                continue
            # Any message proves liveness, so the interval counts from the last send.
            delay = self._last_send + interval - loop.time()
            if delay <= 0:
                await self._send_report()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._heartbeat_changed.wait()

    # -- receiving ---------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            reply = await self.transport.receive()
            round_trip = loop.time() - self._sent_at.popleft() if self._sent_at else None
            self._observer.on_reply(self, reply, round_trip)
            await self._handle(reply)

    async def _handle(self, reply: pb.ServerToAgent) -> None:
        enrollment = self._enrollment
        if reply.HasField("error_response"):
            error = reply.error_response
            if (
                enrollment is not None
                and enrollment.awaiting_answer
                and error.type == pb.ServerErrorResponseType_BadRequest
            ):
                await self._on_request_refused(error.error_message or "no reason given")
                return
            self._on_error_response(error)
            return
        self._backoff.reset()
        if reply.HasField("agent_identification"):
            self._adopt_instance_uid(reply.agent_identification.new_instance_uid)
        if enrollment is not None and reply.capabilities:
            self._note_server_capabilities(enrollment, reply.capabilities)
        if reply.HasField("connection_settings") and reply.connection_settings.HasField("opamp"):
            if enrollment is not None:
                await self._on_connection_settings(reply.connection_settings)
            else:
                self._adopt_heartbeat(reply.connection_settings.opamp.heartbeat_interval_seconds)
        if enrollment is not None and reply.HasField("custom_message"):
            self._on_custom_message(enrollment, reply.custom_message)
        if reply.flags & ServerToAgentFlags.REPORT_FULL_STATE:
            self._log.info("server asked for a full report")
            self._full_report_due = True
        if reply.HasField("remote_config"):
            # A full report that is due rides on the APPLYING message.
            await self._on_remote_config(reply.remote_config)
        if self._full_report_due:
            await self._send_report()
        if enrollment is not None:
            await self._request_certificate_if_due()

    def _on_error_response(self, error: pb.ServerErrorResponse) -> None:
        reason = error.error_message or "no reason given"
        if error.type == pb.ServerErrorResponseType_Unavailable:
            retry_after = None
            if error.HasField("retry_info"):
                retry_after = error.retry_info.retry_after_nanoseconds / 1e9
            raise TransportError(f"server unavailable: {reason}", retry_after=retry_after)
        kind = pb.ServerErrorResponseType.Name(error.type).removeprefix("ServerErrorResponseType_")
        self._log.warning("server reported an error (%s): %s", kind, reason)

    # -- certificate enrollment ----------------------------------------------------------

    def _note_server_capabilities(self, enrollment: Enrollment, capabilities: int) -> None:
        accepts = bool(capabilities & ServerCapabilities.ACCEPTS_CONNECTION_SETTINGS_REQUEST)
        first_word = not enrollment.server_capabilities_seen
        enrollment.server_capabilities_seen = True
        enrollment.server_accepts_requests = accepts
        if not accepts and first_word and (reason := enrollment.request_reason(self._instance_uid)):
            detail = f"the server does not accept certificate requests (needed: {reason})"
            self._log.warning("%s", detail)
            self._observer.on_enrollment(self, EnrollmentEvent.CSR_NOT_ACCEPTED, detail)

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
        self._observer.on_enrollment(self, EnrollmentEvent.CSR_SENT, detail)

    async def _on_request_refused(self, message: str) -> None:
        enrollment = self._enrollment
        assert enrollment is not None
        async with self._enrollment_lock:
            _, delay = await asyncio.to_thread(enrollment.request_refused, message)
        detail = f"the server refused the certificate request: {message}"
        self._log.warning("%s; a new request follows on a later connection, not before %.0f s", detail, delay)
        self._observer.on_enrollment(self, EnrollmentEvent.CSR_REFUSED, detail)
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
            self._observer.on_enrollment(self, EnrollmentEvent.CERTIFICATE_REFUSED, detail)
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
        self._observer.on_enrollment(self, EnrollmentEvent.CERTIFICATE_APPLIED, detail)
        raise _Reconnect

    async def _renewal_loop(self) -> None:
        assert self._enrollment is not None
        while True:
            await asyncio.sleep(self._enrollment.settings.renewal_check_interval)
            await self._request_certificate_if_due()

    def _adopt_instance_uid(self, new_uid: bytes) -> None:
        if problem := instance_uid_problem(new_uid):
            self._log.warning("ignoring the server's new instance_uid: %s", problem)
            return
        if new_uid == self._instance_uid:
            return
        try:
            self._state.save_instance_uid(new_uid)
        except OSError as error:
            # Keep going with the new identity: the server already uses it.
            self._log.error("could not persist the new instance_uid: %s", error)
        old, self._instance_uid = self._instance_uid, new_uid
        self._log.info("server assigned instance_uid %s (was %s)", uuid.UUID(bytes=new_uid), uuid.UUID(bytes=old))
        # service.instance.id follows the instance_uid, so the description changed.
        self._full_report_due = True

    def _adopt_heartbeat(self, seconds: int) -> None:
        if seconds == self._server_heartbeat_seconds:
            return
        self._server_heartbeat_seconds = seconds
        self._log.info("server set the heartbeat interval to %d s", seconds)
        self._heartbeat_changed.set()

    async def _on_remote_config(self, remote: pb.AgentRemoteConfig) -> None:
        if not self.settings.accept_remote_config:
            self._log.warning("ignoring a remote config: AcceptsRemoteConfig is not declared")
            return
        # The server always sets config_hash; hashing here keeps an unhashed offer from
        # matching the empty hash of an agent that never received a config.
        files = report.config_files(remote.config)
        if remote.config_hash:
            config_hash = remote.config_hash
        elif self.settings.requires_signed_config:
            config_hash = content_hash(files)  # what the signature covers
        else:
            config_hash = config_map_hash(files)
        # Compared with the last hash received, not the last applied: a config that failed
        # is not retried in a loop, and a rollback to the applied one is applied again.
        if config_hash == self._remote.last_hash:
            return
        previous = self._remote
        self._remote = replace(
            previous,
            last_hash=config_hash,
            status=pb.RemoteConfigStatuses_APPLYING,
            error_message="",
        )
        self._log.info("applying remote config %s (%d files)", config_hash.hex()[:16], len(files))
        try:
            await self._send_report(remote_config_status=True)
            outcome = await self._apply(files, config_hash, previous)
        except BaseException:
            # The session ended mid-apply. Reporting APPLYING for this hash on the next
            # session would stop the server from offering it again, and nothing would finish
            # the apply: fall back to the last outcome so the offer is repeated.
            self._remote = previous
            raise
        self._remote = outcome
        try:
            await asyncio.to_thread(self._state.save_remote_config, outcome)
        except OSError as error:
            self._log.error("could not persist the remote config status: %s", error)

        if outcome.status == pb.RemoteConfigStatuses_APPLIED:
            self._log.info("remote config %s applied", config_hash.hex()[:16])
            await self._send_report(remote_config_status=True, effective_config=True)
        else:
            self._log.warning("remote config %s failed: %s", config_hash.hex()[:16], outcome.error_message)
            await self._send_report(remote_config_status=True)

    async def _apply(
        self, files: Mapping[str, ConfigFile], config_hash: bytes, previous: RemoteConfigRecord
    ) -> RemoteConfigRecord:
        """Check and install `files`; the outcome is APPLIED, or FAILED with the reason.

        With trusted keys, the signature is checked first and only the files it covers
        (never the signature file) are checked, installed and reported as effective.
        """
        failed = replace(previous, last_hash=config_hash, status=pb.RemoteConfigStatuses_FAILED)
        signings = previous.signings
        if self.settings.apply_delay:
            await asyncio.sleep(self.settings.apply_delay)
        try:
            if self.settings.trusted_keys is not None:
                verified = verify_remote_config(
                    files,
                    offered_hash=config_hash,
                    trusted_keys=self.settings.trusted_keys,
                    applied=previous.signings,
                )
                files = verified.files
                signings = record_signing(previous.signings, verified.envelope)
            check_remote_config(
                files,
                fail_if_contains=self.settings.fail_if_contains,
                fail_apply=self.settings.fail_apply,
            )
            await asyncio.to_thread(self._state.install_config, files)
        except ConfigRejected as error:
            return replace(failed, error_message=str(error))
        except OSError as error:
            return replace(failed, error_message=f"config write failed: {error}")
        return RemoteConfigRecord(
            last_hash=config_hash,
            status=pb.RemoteConfigStatuses_APPLIED,
            applied_hash=config_hash,
            files=files,
            signings=signings,
        )
