"""What every part of the agent shares: its state, what it currently is, and what it sends.

`AgentBase` holds the agent's state (instance_uid, the remote-config record, the enrollment,
sequence numbers, the heartbeat interval the server set), answers what the agent currently
is (capabilities, attributes, heartbeat interval), sends (status reports: the full state
when one is due, else only what is asked; heartbeats) and adopts what the server assigns
(a new instance_uid, a heartbeat interval). `agent_client.agent.Agent` builds on it with
`agent_certificates.CertificateHandling` and `agent_remote_config.RemoteConfigHandling`.
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
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from agent_client import report
from agent_client.agent_settings import AgentSettings
from agent_client.backoff import Backoff
from agent_client.credentials import CredentialStore
from agent_client.enrollment import CAPABILITIES as ENROLLMENT_CAPABILITIES
from agent_client.enrollment import CUSTOM_CAPABILITY as CERTIFICATE_CAPABILITY
from agent_client.enrollment import Enrollment
from agent_client.packages import PackageRunner
from agent_client.state import AgentState, RemoteConfigRecord
from agent_client.transport import Transport
from agent_client.version import __version__
from opamp.identifiers import instance_uid_problem, new_instance_uid
from opamp.proto import opamp_pb2 as pb

logger = logging.getLogger("agent_client")

DEFAULT_SERVICE_NAME = "opamp-agent-client"

SERVICE_NAME = "service.name"
SERVICE_INSTANCE_ID = "service.instance.id"
SERVICE_VERSION = "service.version"
HOST_NAME = "host.name"
OS_TYPE = "os.type"

# Send times kept for pairing replies with requests; a server that stops answering
# must not make the queue grow without bound.
_MAX_UNANSWERED = 1024


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


class AgentBase:
    """The agent's state and its sending side; `agent_client.agent.Agent` is the agent."""

    def __init__(
        self,
        *,
        transport: Transport,
        state: AgentState,
        settings: AgentSettings | None = None,
        name: str | None = None,
        credentials: CredentialStore | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.transport = transport
        self.settings = settings or AgentSettings()
        self.name = name
        self._state = state
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
        # The status of the telemetry connection settings last offered
        # (agent_client.agent_connection_settings); None: the enrollment's is reported.
        self._settings_status: pb.ConnectionSettingsStatus | None = None

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
        # Restarts the server asked for and this agent carried out.
        self.restarts = 0

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
        package_statuses: bool = False,
        health: bool = False,
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
            if connection_settings_status and (status := self._connection_settings_status(unset=True)):
                message.connection_settings_status.CopyFrom(status)
            if package_statuses and (statuses := self._package_statuses_report()) is not None:
                message.package_statuses.CopyFrom(statuses)
            if health:
                message.health.CopyFrom(self._health())
        if csr is not None:
            message.connection_settings_request.opamp.certificate_request.csr = csr
        await self._send(message)

    def _fill_full_report(self, message: pb.AgentToServer) -> None:
        message.agent_description.CopyFrom(
            report.agent_description(self.identifying_attributes(), self.non_identifying_attributes())
        )
        message.health.CopyFrom(self._health())
        message.effective_config.CopyFrom(report.effective_config(self._remote.files))
        message.remote_config_status.CopyFrom(report.remote_config_status(self._remote))
        if custom := self.custom_capabilities:
            message.custom_capabilities.capabilities.extend(custom)
        if status := self._connection_settings_status(unset=False):
            message.connection_settings_status.CopyFrom(status)
        if (statuses := self._package_statuses_report()) is not None:
            message.package_statuses.CopyFrom(statuses)

    def _package_statuses_report(self) -> pb.PackageStatuses | None:
        """The package statuses to report; None for an agent that does not handle packages."""
        return None

    def _health(self) -> pb.ComponentHealth:
        """The health to report: the agent's own, unless it runs a managed process."""
        return report.component_health(start_time_unix_nano=self._start_time_unix_nano)

    def _config_applied(self) -> None:
        """A remote config was just applied (its files are in the state)."""

    def _package_runner(self) -> PackageRunner | None:
        """What runs from an installed package (called on the event loop); None: nothing."""
        return None

    def _connection_settings_status(self, *, unset: bool) -> pb.ConnectionSettingsStatus | None:
        """The status of the last connection settings offer: the telemetry settings' when
        they were in it (unless the certificate in the same offer failed), else the
        enrollment's (`unset`: even before it has one)."""
        own = self._settings_status
        if self._enrollment is None:
            return own
        if own is not None:
            enrolled = self._enrollment.status
            failed = enrolled.status == pb.ConnectionSettingsStatuses_FAILED
            return (
                self._enrollment.status.to_proto()
                if failed and enrolled.last_hash == own.last_connection_settings_hash
                else own
            )
        if not unset and self._enrollment.status.status == pb.ConnectionSettingsStatuses_UNSET:
            return None
        return self._enrollment.status.to_proto()

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

    # -- what the server assigns -------------------------------------------------------

    def _start_as_new_process(self) -> None:
        """After a Restart command: what a new process of the agent would have. Sequence
        numbers from 0, a new start time, no heartbeat interval from the server, and a full
        report first (the identity and the remote config it runs are kept, as on disk)."""
        self.restarts += 1
        self._sequence_num = 0
        self._start_time_unix_nano = time.time_ns()
        self._server_heartbeat_seconds = None
        self._full_report_due = True
        self._backoff.reset()

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
