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

An agent that accepts restarts (`AgentSettings.accept_restart`, declared as
AcceptsRestartCommand) ignores the rest of a message carrying a Restart command (as the
protocol says). With a managed process (`AgentSettings.managed`, `agent_managed`) it
restarts that process and keeps its session; its next health report carries the process's
new start time. Without one it ends the session with `agent_disconnect` and comes back as a
new process would (`_start_as_new_process`: a new connection, sequence numbers from 0, a
new start time in its health, a full report), after `restart_delay` seconds.

The agent is put together from topic modules: `agent_settings` (AgentSettings),
`agent_base` (its state, what it is, what it sends), `agent_certificates` (certificate
enrollment within sessions), `agent_remote_config` (remote config offers and applying
them), `agent_packages` (package offers and installs), `agent_connection_settings`
(telemetry connection settings) and `agent_managed` (the managed process). This module
holds the session's life cycle, the dispatch of what the server sends, and the observer
hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from agent_client.agent_certificates import CertificateHandling, Reconnect
from agent_client.agent_connection_settings import ConnectionSettingsHandling
from agent_client.agent_managed import ManagedProcessHandling
from agent_client.agent_packages import PackageHandling
from agent_client.agent_remote_config import RemoteConfigHandling
from agent_client.agent_settings import AgentSettings
from agent_client.credentials import CredentialStore
from agent_client.enrollment import EnrollmentEvent
from agent_client.state import AgentState
from agent_client.transport import CredentialRefused, Transport, TransportError
from opamp.capabilities import ServerToAgentFlags
from opamp.proto import opamp_pb2 as pb


class Restart(Exception):
    """The server asked the agent to restart: end the session, come back as a new process."""


class AgentObserver:
    """Hooks for measuring agents (the fleet simulator's statistics). All are optional."""

    def on_connected(self, agent: Agent) -> None:
        """A session opened; its full report is about to be sent."""

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        """A ServerToAgent arrived.

        `round_trip` pairs replies with sends in order, which is exact for a server that
        answers every message once; a server push shifts the pairing.
        """

    def on_restart(self, agent: Agent) -> None:
        """The agent carries out a Restart command (it restarts its managed process, or,
        without one, reconnects as a new process)."""

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        """A session ended with `error`; the next attempt starts in `retry_in` seconds."""

    def on_enrollment(self, agent: Agent, event: EnrollmentEvent, detail: str) -> None:
        """Certificate enrollment made progress or failed; `detail` is a human-readable line."""


class Agent(
    CertificateHandling, RemoteConfigHandling, PackageHandling, ConnectionSettingsHandling, ManagedProcessHandling
):
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
        self._observer = observer or AgentObserver()
        super().__init__(
            transport=transport, state=state, settings=settings, name=name, credentials=credentials, clock=clock
        )
        self._load_connection_settings()

    # -- life cycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to send agent_disconnect, close the connection and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Keep a session with the server (and the managed process running) until `stop()`."""
        managed = self._managed
        if managed is not None:
            managed.start()
        try:
            await self._sessions()
        finally:
            if managed is not None:
                await managed.stop()

    async def _sessions(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._session()
                return
            except Reconnect:
                await self._disconnect()
                self._backoff.reset()
                self._log.info("reconnecting to present the new client certificate")
                continue
            except Restart:
                await self._disconnect()  # closes the connection
                self._start_as_new_process()
                self._log.info("restarting as the server asked (restart %d)", self.restarts)
                self._observer.on_restart(self)
                if self.settings.restart_delay:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.restart_delay):
                            await self._stopping.wait()
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
            self._health_changed.clear()  # the full report carries the health
            await self._send_report()

            loops = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._heartbeat_loop())]
            if self._enrollment is not None:
                loops.append(asyncio.ensure_future(self._renewal_loop()))
            if self._managed is not None:
                loops.append(asyncio.ensure_future(self._health_loop()))
            done, _ = await asyncio.wait([stop_requested, *loops], return_when=asyncio.FIRST_COMPLETED)
            if stop_requested not in done:
                for task in loops:
                    if task in done:
                        task.result()  # the loops only end by raising
        finally:
            for task in (stop_requested, *loops):
                task.cancel()
            await asyncio.gather(stop_requested, *loops, return_exceptions=True)
            await self._stop_package_work()
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
        if reply.HasField("command"):
            # The command travels alone: the rest of the message is ignored.
            if reply.command.type == pb.CommandType_Restart and self.settings.accept_restart:
                if self._managed is None:
                    raise Restart
                self.restarts += 1
                self._observer.on_restart(self)
                self._managed.request_restart(f"the server asked (restart {self.restarts})")
                return
            self._log.warning("ignored a command the agent does not support (%s)", reply.command.type)
            return
        if reply.HasField("agent_identification"):
            self._adopt_instance_uid(reply.agent_identification.new_instance_uid)
        if enrollment is not None and reply.capabilities:
            self._note_server_capabilities(enrollment, reply.capabilities)
        if reply.HasField("connection_settings"):
            offers = reply.connection_settings
            if enrollment is None and offers.HasField("opamp"):
                # Adopted before the offer is reported applied: whoever reads the status (the
                # server, an operator) then finds the whole offer in effect, not part of it.
                self._adopt_heartbeat(offers.opamp.heartbeat_interval_seconds)
            await self._on_telemetry_settings(offers)
            if enrollment is not None and offers.HasField("opamp"):
                await self._on_connection_settings(offers)
        if enrollment is not None and reply.HasField("custom_message"):
            self._on_custom_message(enrollment, reply.custom_message)
        if reply.flags & ServerToAgentFlags.REPORT_FULL_STATE:
            self._log.info("server asked for a full report")
            self._full_report_due = True
        if reply.HasField("remote_config"):
            # A full report that is due rides on the APPLYING message.
            await self._on_remote_config(reply.remote_config)
        if reply.HasField("packages_available"):
            await self._on_packages_available(reply.packages_available)
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

    def _notify_enrollment(self, event: EnrollmentEvent, detail: str) -> None:
        self._observer.on_enrollment(self, event, detail)
