"""The command line's subcommands: what `run`, `enroll` and `simulate` do with the parsed options.

`agent_client.cli` parses the command line and hands the options to `run_main`,
`enroll_main` or `simulate_main` here; each returns the process's exit status (the
`EXIT_*` values, described in `agent_client.cli`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.credentials import CredentialStore
from agent_client.enrollment import TOKEN_PREFIX, EnrollmentEvent, EnrollmentSettings
from agent_client.managed_process import ManagedProcessSettings, command_from_template
from agent_client.packages import CURRENT, PackageSettings, command_start_check
from agent_client.signed_config import trusted_keys_by_id
from agent_client.simulator import Fleet, progress_line, spread_evenly, with_packages
from agent_client.state import CONFIG_DIR, FileState, StateError
from agent_client.transport import CredentialRefused, HttpTransport, WebSocketTransport
from opamp.proto import opamp_pb2 as pb

logger = logging.getLogger("agent_client")

EXIT_OK = 0
EXIT_STATE_ERROR = 1
EXIT_USAGE = 2
EXIT_PENDING = 3
EXIT_CREDENTIAL_REFUSED = 4
EXIT_REFUSED = 5
EXIT_NO_ANSWER = 6
EXIT_NOT_SUPPORTED = 7
CREDENTIAL_REFUSED = "server refused the credential (401/403)"


# --- run --------------------------------------------------------------------------------


def settings_from_options(options: argparse.Namespace) -> AgentSettings:
    marker: str | None = options.fail_if_contains
    keys: list[Ed25519PublicKey] = [*options.trusted_key, *(options.trusted_keys_dir or [])]
    return AgentSettings(
        identifying_attributes=dict(options.attr),
        non_identifying_attributes=dict(options.label),
        heartbeat_interval=options.heartbeat,
        accept_remote_config=options.accept_remote_config,
        accept_connection_settings=options.accept_connection_settings,
        fail_if_contains=marker.encode("utf-8") if marker else None,
        fail_apply=options.fail_apply,
        trusted_keys=trusted_keys_by_id(keys) if keys else None,
        # A token given to `run` is sent on every connection, certificate or not.
        enrollment=EnrollmentSettings(token=options.token, send_token_with_certificate=True, key_type=options.key_type),
        packages=package_settings_from_options(options),
        managed=managed_settings_from_options(options),
    )


def package_settings_from_options(options: argparse.Namespace) -> PackageSettings | None:
    if options.packages_dir is None:
        return None
    check = options.package_start_check
    return PackageSettings(
        directory=options.packages_dir,
        start_check=command_start_check(shlex.split(check)) if check else None,
        ca_file=options.ca_file,
    )


def managed_settings_from_options(options: argparse.Namespace) -> ManagedProcessSettings | None:
    """The managed process `run` is given, if any; ValueError for a bad combination."""
    package: str | None = options.managed_package
    if options.managed_command is None:
        if package is not None:
            raise ValueError("--managed-package needs --managed-command")
        return None
    current = None
    if package is not None:
        if options.packages_dir is None:
            raise ValueError("--managed-package needs --packages-dir")
        current = options.packages_dir / package / CURRENT
    command = command_from_template(
        shlex.split(options.managed_command), current=current, config_dir=options.state_dir / CONFIG_DIR
    )
    return ManagedProcessSettings(command=command, package=package, start_check_seconds=options.managed_start_check)


async def run_until_signalled(agent: Agent) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        logger.info("received %s, disconnecting", signum.name)
        agent.stop()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await agent.run()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _describe_credentials(agent: Agent) -> None:
    enrollment = agent.enrollment
    if enrollment is None:
        return
    for path in enrollment.store.loose_permissions():
        logger.warning("%s can be read by other users; it should be mode 0600", path)
    usable = enrollment.usable_credentials(agent.instance_uid)
    if usable is not None and not agent.transport.secure:
        logger.warning("the server URL is not TLS: the client certificate cannot be presented there")
    elif usable is not None:
        logger.info("presenting the client certificate (%s)", usable.describe())
    if reason := enrollment.request_reason(agent.instance_uid):
        pending = " (a request is pending)" if enrollment.pending is not None else ""
        logger.info("will request a certificate: %s%s", reason, pending)
    if enrollment.settings.token and not enrollment.settings.token.startswith(TOKEN_PREFIX):
        logger.warning("the token does not look like an enrollment token (%s...)", TOKEN_PREFIX)


def run_main(options: argparse.Namespace, transport: WebSocketTransport | HttpTransport) -> int:
    try:
        settings = settings_from_options(options)
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_USAGE
    try:
        # The credential store first: it creates a missing state directory 0700.
        store = CredentialStore(options.state_dir)
        enrolling = options.token is not None or store.holds_credentials()
        agent = Agent(
            transport=transport,
            state=FileState(options.state_dir),
            settings=settings,
            credentials=store if enrolling else None,
        )
    except (StateError, OSError) as error:
        logger.error("cannot use state directory %s: %s", options.state_dir, error)
        return EXIT_STATE_ERROR
    logger.info(
        "agent %s starting (%s transport)",
        agent.identifying_attributes()["service.instance.id"],
        "HTTP polling" if transport.polls else "WebSocket",
    )
    if agent.settings.trusted_keys is not None:
        logger.info(
            "requiring signed configs, trusted keys: %s", ", ".join(sorted(agent.settings.trusted_keys)) or "none"
        )
    _describe_credentials(agent)
    asyncio.run(run_until_signalled(agent))
    logger.info("stopped")
    return EXIT_OK


# --- enroll -----------------------------------------------------------------------------


class EnrollmentWatcher(AgentObserver):
    """Turns what the agent reports into the outcome of `enroll`: an exit status and a line."""

    def __init__(self) -> None:
        self.outcome: tuple[int, str] | None = None
        self.request: str | None = None
        self.last_error: str | None = None
        self.answered = False

    def _finish(self, agent: Agent, code: int, message: str) -> None:
        if self.outcome is None:
            self.outcome = (code, message)
        agent.stop()

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        self.answered = True

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        if isinstance(error, CredentialRefused):
            self._finish(
                agent,
                EXIT_CREDENTIAL_REFUSED,
                f"{CREDENTIAL_REFUSED}: the server answered HTTP {error.status}; check that the enrollment "
                "token is right and neither expired, revoked nor used up",
            )
        else:
            self.last_error = str(error)

    def on_enrollment(self, agent: Agent, event: EnrollmentEvent, detail: str) -> None:
        if event is EnrollmentEvent.CSR_SENT:
            self.request = detail
        elif event is EnrollmentEvent.CERTIFICATE_APPLIED:
            self._finish(agent, EXIT_OK, detail)
        elif event in (EnrollmentEvent.CSR_REFUSED, EnrollmentEvent.CERTIFICATE_REFUSED):
            self._finish(agent, EXIT_REFUSED, detail)
        elif event is EnrollmentEvent.CSR_NOT_ACCEPTED:
            self._finish(agent, EXIT_NOT_SUPPORTED, detail)

    def timed_out(self, agent: Agent, timeout: float) -> tuple[int, str]:
        uid = uuid.UUID(bytes=agent.instance_uid)
        if self.request is not None:
            return (
                EXIT_PENDING,
                f"the certificate request for agent {uid} is pending approval ({self.request}); "
                "once an operator approved it, run this command again: it sends the same request",
            )
        if self.answered:
            return EXIT_NO_ANSWER, f"the server answered but no certificate request could be sent within {timeout:g} s"
        problem = f": {self.last_error}" if self.last_error else ""
        return EXIT_NO_ANSWER, f"no answer from the server within {timeout:g} s{problem}"


async def enroll(agent: Agent, watcher: EnrollmentWatcher, *, timeout: float) -> tuple[int, str]:
    """Run `agent` until the watcher has an outcome, a signal, or `timeout` seconds."""
    task = asyncio.create_task(run_until_signalled(agent))
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        agent.stop()
        await task
    else:
        task.result()
    if watcher.outcome is not None:
        return watcher.outcome
    return watcher.timed_out(agent, timeout)


def enroll_main(options: argparse.Namespace, transport: WebSocketTransport | HttpTransport) -> int:
    settings = AgentSettings(
        heartbeat_interval=options.heartbeat,
        # Enrolling only: no config is applied on the way.
        accept_remote_config=False,
        enrollment=EnrollmentSettings(token=options.token, key_type=options.key_type),
    )
    watcher = EnrollmentWatcher()
    try:
        store = CredentialStore(options.state_dir)
        agent = Agent(
            transport=transport,
            state=FileState(options.state_dir),
            settings=settings,
            observer=watcher,
            credentials=store,
        )
    except (StateError, OSError) as error:
        logger.error("cannot use state directory %s: %s", options.state_dir, error)
        return EXIT_STATE_ERROR
    enrollment = agent.enrollment
    assert enrollment is not None
    uid = uuid.UUID(bytes=agent.instance_uid)
    reason = enrollment.request_reason(agent.instance_uid)
    held = enrollment.usable_credentials(agent.instance_uid)
    if reason is None and held is not None:
        print(f"agent {uid} already holds a certificate not due for renewal ({held.describe()})")
        return EXIT_OK
    if options.token is None and (held is None or not transport.secure):
        logger.error("enroll needs --token: there is no certificate in %s to authenticate with", options.state_dir)
        return EXIT_USAGE
    _describe_credentials(agent)
    code, message = asyncio.run(enroll(agent, watcher, timeout=options.timeout))
    if code == EXIT_OK:
        print(f"agent {uid} enrolled: {message}; stored in {options.state_dir}")
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


# --- simulate ---------------------------------------------------------------------------


def simulate_fleet(options: argparse.Namespace) -> Fleet:
    """The fleet `simulate` runs: shared settings, and the failing share's own."""
    marker: str | None = options.fail_if_contains
    healthy = AgentSettings(
        identifying_attributes=dict(options.attr),
        non_identifying_attributes=dict(options.label),
        heartbeat_interval=options.heartbeat,
        apply_delay=options.apply_delay,
        restart_delay=options.restart_delay,
    )
    failing = replace(healthy, fail_if_contains=marker.encode("utf-8")) if marker else healthy
    chosen = spread_evenly(options.agents, options.fail_fraction) if marker else set()
    settings_for: Callable[[int], AgentSettings] = lambda index: failing if index in chosen else healthy  # noqa: E731
    if options.packages:
        settings_for = with_packages(
            settings_for,
            count=options.agents,
            packages=PackageSettings(),
            fail_fraction=options.package_fail_fraction,
            skip_download_fraction=options.package_skip_download_fraction,
        )
    return Fleet(
        server=options.server,
        count=options.agents,
        settings_for=settings_for,
        transport=options.transport,
        headers=dict(options.header),
        state_root=options.state_root,
        connect_rate=options.connect_rate,
    )


async def run_simulation(fleet: Fleet, *, duration: float | None, interval: float, out: TextIO) -> None:
    """Run the fleet until SIGINT/SIGTERM or `duration`, writing the progress line each `interval`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    # On a terminal the line is rewritten in place; in a pipe or a file, one line each time.
    rewrite = out.isatty()
    started = time.monotonic()
    starting = asyncio.create_task(fleet.start())
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if duration is not None and elapsed >= duration:
                break
            line = f"{elapsed:6.1f}s {progress_line(fleet)}"
            out.write(f"\r{line}\x1b[K" if rewrite else f"{line}\n")
            out.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        for signum in signals:
            loop.remove_signal_handler(signum)
        await fleet.stop()
    out.write(f"{chr(10) if rewrite else ''}stopped: {progress_line(fleet)}\n")
    out.flush()


def simulate_main(options: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        fleet = simulate_fleet(options)
    except ValueError as error:
        parser.error(str(error))
    failing = ""
    if options.fail_if_contains:
        share = len(spread_evenly(options.agents, options.fail_fraction))
        failing = f"; {share} of them fail configs containing {options.fail_if_contains!r}"
    print(f"simulating {options.agents} agents against {options.server}{failing}", flush=True)
    asyncio.run(run_simulation(fleet, duration=options.duration, interval=options.progress_interval, out=sys.stdout))
    return EXIT_OK
