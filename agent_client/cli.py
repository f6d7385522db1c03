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

With `--packages-dir DIR` the agent accepts packages: it installs offered packages signed by
one of those keys into DIR/<name>/<version>/, switches DIR/<name>/current to them, and with
`--package-start-check 'CMD {path}'` switches a top-level package back when CMD fails.

With `--managed-command 'ARGV'` the agent runs in supervisor mode: it starts ARGV when it
starts, restarts it (with a doubling delay) when it exits, reports it as its health
(healthy, start time, pid, the last exit status), restarts it on a Restart command instead
of restarting itself and after applying a remote config, and stops it (SIGTERM, SIGKILL
after a grace) when it stops. ARGV may name `{config_dir}` (STATE_DIR/config, the applied
config files) and, with `--managed-package NAME`, `{current}` (DIR/NAME/current): a new
version of NAME restarts the process on it, and when the process does not keep running for
`--managed-start-check` seconds (default 3) the version is reported failed, `current`
switches back and the process is started on the previous version again. For example:

    python -m agent_client run ... --packages-dir ./packages --trusted-key signing.pem \
        --managed-package collector --managed-command '{current}/collector --config {config_dir}/collector.yaml'
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client.agent_settings import DEFAULT_HEARTBEAT_INTERVAL
from agent_client.cli_commands import enroll_main, run_main, simulate_main
from agent_client.credentials import DEFAULT_KEY_TYPE, KEY_TYPES
from agent_client.enrollment import TOKEN_PREFIX
from agent_client.managed_process import DEFAULT_START_CHECK_SECONDS
from agent_client.transport import transport_for_url
from opamp.config_signature import SigningKeyError, load_public_key_pem, load_public_keys_dir

DEFAULT_ENROLL_TIMEOUT = 60.0
DEFAULT_ENROLL_POLL = 5.0


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
        "--accept-connection-settings",
        action="store_true",
        help="declare the telemetry connection settings capabilities; offered destinations are written "
        "to STATE_DIR/connection-settings.json",
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
    run.add_argument(
        "--packages-dir",
        type=Path,
        metavar="DIR",
        help="accept packages signed by a trusted key and install them under DIR",
    )
    run.add_argument(
        "--package-start-check",
        metavar="COMMAND",
        help="run after switching a top-level package ({name}, {version}, {path} replaced); "
        "a non-zero exit switches back",
    )
    run.add_argument(
        "--managed-command",
        metavar="ARGV",
        help="run ARGV as the managed process ({current} and {config_dir} replaced; see above)",
    )
    run.add_argument(
        "--managed-package",
        metavar="NAME",
        help="the package the managed process runs from: {current} is DIR/NAME/current (needs --packages-dir)",
    )
    run.add_argument(
        "--managed-start-check",
        type=positive_seconds,
        default=DEFAULT_START_CHECK_SECONDS,
        metavar="SECONDS",
        help="how long the managed process must keep running on a new package version "
        f"(default: {DEFAULT_START_CHECK_SECONDS:g})",
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
    simulate.add_argument(
        "--restart-delay",
        type=non_negative_seconds,
        default=0.0,
        metavar="S",
        help="seconds an agent stays away when the server restarts it",
    )
    simulate.add_argument(
        "--packages", action="store_true", help="accept packages (files are downloaded and hashed, not kept)"
    )
    simulate.add_argument(
        "--package-fail-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="share of the agents (0-1) that fail every package install (default: 0)",
    )
    simulate.add_argument(
        "--package-skip-download-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="share of the agents (0-1) that never download package files (default: 0, all download)",
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
    return run_main(options, transport)
