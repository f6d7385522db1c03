"""Command line: enroll an agent for a client certificate; run one agent until SIGINT or SIGTERM.

    python -m agent_client enroll --server wss://opamp.example:4320/v1/opamp --state-dir ./agent-state \\
        --token opamp_et_... [--ca-file server-ca.pem] [--timeout 60] [--key-type ecdsa-p256]
    python -m agent_client run --server ws://127.0.0.1:4320/v1/opamp --state-dir ./agent-state \\
        --attr service.name=edge --label deployment.environment=dev --heartbeat 10

`enroll` connects with the enrollment token, sends a certificate request and waits up to
`--timeout` seconds for the certificate, which it stores in the state directory. Exit
status: 0 enrolled (or already holding a certificate not due for renewal), 1 unusable state
directory, 2 bad usage, 3 the request is pending approval (approve it, run `enroll` again:
the same request is sent again), 4 the server refused the credential (401/403), 5 the
server refused the request or offered a certificate the agent refused, 6 no answer from the
server in time, 7 the server does not accept certificate requests.

`run` presents the stored certificate automatically (wss:// and https:// only). With
`--token` it also enrolls (and renews) inline, and keeps sending the token on every
connection because it was given; to stop sending it, run `enroll` once and then `run`
without `--token`. Without `--token` enrollment stays on when the state directory already
holds a certificate or a pending request, so the certificate is renewed before it expires.

One log line per notable event (connected, disconnected and when it retries, config
applying/applied/failed, new instance_uid, heartbeat interval changed, shut down). On a
signal the agent sends agent_disconnect, closes the connection and exits with status 0.

With `--trusted-key PATH` (repeatable) or `--trusted-keys-dir DIR` (every `*.pem` in it) the
agent requires signed configs: it declares `io.opamp.signed-config/v1` and applies only a
config whose `opamp-signature.json` verifies with one of those Ed25519 public keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import DEFAULT_HEARTBEAT_INTERVAL, AgentSettings
from agent_client.credentials import DEFAULT_KEY_TYPE, KEY_TYPES, CredentialStore
from agent_client.enrollment import TOKEN_PREFIX, EnrollmentEvent, EnrollmentSettings
from agent_client.signed_config import trusted_keys_by_id
from agent_client.simulator import Fleet, progress_line, spread_evenly
from agent_client.state import FileState, StateError
from agent_client.transport import CredentialRefused, HttpTransport, WebSocketTransport, transport_for_url
from opamp.config_signature import SigningKeyError, load_public_key_pem, load_public_keys_dir
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
DEFAULT_ENROLL_TIMEOUT = 60.0
DEFAULT_ENROLL_POLL = 5.0
CREDENTIAL_REFUSED = "server refused the credential (401/403)"


def parse_key_value(text: str) -> tuple[str, str]:
    """`key=value` (the value may contain '=') -> (key, value)."""
    key, separator, value = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` -> (name, value), as curl writes headers."""
    name, separator, value = text.partition(":")
    name = name.strip()
    if not separator or not name or any(char.isspace() for char in name):
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name, value.strip()


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def public_key_file(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    try:
        return load_public_key_pem(Path(text).read_bytes())
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {error.strerror or error}") from None
    except SigningKeyError as error:
        raise argparse.ArgumentTypeError(f"{text}: {error}") from None


def public_keys_dir(text: str) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in the `*.pem` files of a directory; at least one."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    keys = list(load_public_keys_dir(text).values())
    if not keys:
        raise argparse.ArgumentTypeError(f"no Ed25519 public key (*.pem) in {text}")
    return keys


def token_file(text: str) -> str:
    """The enrollment token from the first line of a file (keeps it out of `ps`)."""
    try:
        token = Path(text).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {error}") from None
    if not token:
        raise argparse.ArgumentTypeError(f"{text} is empty")
    return token


def readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a readable file: {text}")
    return path


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, help="ws(s):// or http(s):// URL of /v1/opamp")
    parser.add_argument("--state-dir", required=True, type=Path, help="where identity, keys and config live")
    parser.add_argument(
        "--transport",
        choices=("ws", "http"),
        help="default: from the URL scheme (http/https poll over plain HTTP)",
    )
    parser.add_argument(
        "--header",
        action="append",
        type=parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="HTTP header sent with every request or upgrade, e.g. 'Authorization: Bearer X'",
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token", metavar="SECRET", help=f"enrollment token ({TOKEN_PREFIX}...), sent as a Bearer token"
    )
    token.add_argument("--token-file", type=token_file, dest="token", metavar="PATH", help="read the token from PATH")
    parser.add_argument(
        "--ca-file",
        type=readable_file,
        metavar="PATH",
        help="PEM bundle to verify a wss:// or https:// server with (default: the system trust store for "
        "WebSocket, httpx's for HTTP)",
    )
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default=DEFAULT_KEY_TYPE,
        help=f"key pair for certificate requests (default: {DEFAULT_KEY_TYPE})",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent_client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    enroll = commands.add_parser("enroll", help="get a client certificate with an enrollment token, store it, exit")
    _add_connection_options(enroll)
    enroll.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_ENROLL_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the certificate (default: {DEFAULT_ENROLL_TIMEOUT:g})",
    )
    enroll.add_argument(
        "--heartbeat",
        type=positive_seconds,
        default=DEFAULT_ENROLL_POLL,
        metavar="SECONDS",
        help=f"polling interval over plain HTTP while waiting (default: {DEFAULT_ENROLL_POLL:g})",
    )
    run = commands.add_parser("run", help="run one agent until SIGINT/SIGTERM")
    _add_connection_options(run)
    run.add_argument(
        "--attr",
        action="append",
        type=parse_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="identifying attribute (repeatable); overrides service.name and friends",
    )
    run.add_argument(
        "--label",
        action="append",
        type=parse_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="non-identifying attribute (repeatable)",
    )
    run.add_argument(
        "--heartbeat",
        type=positive_seconds,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="heartbeat / polling interval until the server offers one (default: 30)",
    )
    run.add_argument(
        "--fail-if-contains",
        metavar="MARKER",
        help="drill: fail every config whose body contains MARKER",
    )
    run.add_argument("--fail-apply", action="store_true", help="drill: fail every config")
    run.add_argument(
        "--no-accept-remote-config",
        dest="accept_remote_config",
        action="store_false",
        help="do not declare AcceptsRemoteConfig",
    )
    run.add_argument(
        "--trusted-key",
        action="append",
        type=public_key_file,
        default=[],
        metavar="PATH",
        help="PEM Ed25519 public key trusted to sign configs (repeatable); makes signatures required",
    )
    run.add_argument(
        "--trusted-keys-dir",
        type=public_keys_dir,
        metavar="DIR",
        help="directory of PEM Ed25519 public keys (*.pem) trusted to sign configs; makes signatures required",
    )
    _add_simulate_parser(commands)
    return parser


def _bounded_number(
    text: str, convert: Callable[[str], float], allowed: Callable[[float], bool], kind: str, bounds: str
) -> Any:
    """An argparse type: `text` as a number of `kind` that `allowed` accepts, else a usage error."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(bounds)
    return value


def fraction(text: str) -> float:
    return float(_bounded_number(text, float, lambda v: 0 <= v <= 1, "a number", "must be between 0 and 1"))


def non_negative_seconds(text: str) -> float:
    return float(_bounded_number(text, float, lambda v: v >= 0, "a number", "must not be negative"))


def positive_count(text: str) -> int:
    return int(_bounded_number(text, int, lambda v: v >= 1, "a whole number", "must be at least 1"))


def _add_simulate_parser(commands: Any) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="run N simulated agents with a progress line until SIGINT/SIGTERM (or --duration)",
        description="N agents in one process, each with its own identity, as the server sees real ones. "
        "A share of them (--fail-fraction, spread over the fleet) fails every config containing "
        "--fail-if-contains, so a rollout of such a config exceeds its failure budget.",
    )
    simulate.add_argument("--server", required=True, help="ws(s):// or http(s):// URL of /v1/opamp")
    simulate.add_argument("--transport", choices=("ws", "http"), help="default: from the URL scheme")
    simulate.add_argument(
        "--header", action="append", type=parse_header, default=[], metavar="'NAME: VALUE'", help="sent by every agent"
    )
    simulate.add_argument("--agents", type=positive_count, default=10, metavar="N", help="how many (default: 10)")
    simulate.add_argument(
        "--attr", action="append", type=parse_key_value, default=[], metavar="KEY=VALUE", help="identifying attribute"
    )
    simulate.add_argument(
        "--label", action="append", type=parse_key_value, default=[], metavar="KEY=VALUE", help="non-identifying"
    )
    simulate.add_argument("--fail-if-contains", metavar="MARKER", help="the failing agents reject configs with MARKER")
    simulate.add_argument(
        "--fail-fraction",
        type=fraction,
        default=1.0,
        metavar="F",
        help="share of the agents (0-1) that reject configs with MARKER (default: 1)",
    )
    simulate.add_argument(
        "--apply-delay", type=non_negative_seconds, default=0.0, metavar="S", help="seconds each apply takes"
    )
    simulate.add_argument("--heartbeat", type=positive_seconds, default=DEFAULT_HEARTBEAT_INTERVAL, metavar="SECONDS")
    simulate.add_argument(
        "--state-root",
        type=Path,
        metavar="DIR",
        help="keep each agent's identity in DIR/agent-NNNNN, so a restart brings back the same agents",
    )
    simulate.add_argument(
        "--connect-rate", type=non_negative_seconds, default=50.0, metavar="PER_SECOND", help="0: all at once"
    )
    simulate.add_argument("--duration", type=positive_seconds, metavar="SECONDS", help="stop after this long")
    simulate.add_argument(
        "--progress-interval", type=positive_seconds, default=1.0, metavar="SECONDS", help="progress line period"
    )
    simulate.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def settings_from_options(options: argparse.Namespace) -> AgentSettings:
    marker: str | None = options.fail_if_contains
    keys: list[Ed25519PublicKey] = [*options.trusted_key, *(options.trusted_keys_dir or [])]
    return AgentSettings(
        identifying_attributes=dict(options.attr),
        non_identifying_attributes=dict(options.label),
        heartbeat_interval=options.heartbeat,
        accept_remote_config=options.accept_remote_config,
        fail_if_contains=marker.encode("utf-8") if marker else None,
        fail_apply=options.fail_apply,
        trusted_keys=trusted_keys_by_id(keys) if keys else None,
        # A token given to `run` is sent on every connection, certificate or not.
        enrollment=EnrollmentSettings(token=options.token, send_token_with_certificate=True, key_type=options.key_type),
    )


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


def _setup_logging(options: argparse.Namespace) -> None:
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: one line per poll is noise, not an event.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    _setup_logging(options)
    if options.command == "simulate":
        return simulate_main(options, parser)
    try:
        transport = transport_for_url(
            options.server, kind=options.transport, headers=dict(options.header), ca_file=options.ca_file
        )
    except ValueError as error:
        parser.error(str(error))
    if options.command == "enroll":
        return enroll_main(options, transport)
    try:
        # The credential store first: it creates a missing state directory 0700.
        store = CredentialStore(options.state_dir)
        enrolling = options.token is not None or store.holds_credentials()
        agent = Agent(
            transport=transport,
            state=FileState(options.state_dir),
            settings=settings_from_options(options),
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
    )
    failing = replace(healthy, fail_if_contains=marker.encode("utf-8")) if marker else healthy
    chosen = spread_evenly(options.agents, options.fail_fraction) if marker else set()
    return Fleet(
        server=options.server,
        count=options.agents,
        settings_for=lambda index: failing if index in chosen else healthy,
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
