"""Command line: run one agent until SIGINT or SIGTERM.

    python -m agent_client run --server ws://127.0.0.1:4320/v1/opamp --state-dir ./agent-state \\
        --attr service.name=edge --label deployment.environment=dev --heartbeat 10

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
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client.agent import DEFAULT_HEARTBEAT_INTERVAL, Agent, AgentSettings
from agent_client.signed_config import trusted_keys_by_id
from agent_client.state import FileState, StateError
from agent_client.transport import transport_for_url
from signing.config_signing import SigningKeyError, load_public_key_pem, load_public_keys_dir

logger = logging.getLogger("agent_client")

EXIT_OK = 0
EXIT_STATE_ERROR = 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent_client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one agent until SIGINT/SIGTERM")
    run.add_argument("--server", required=True, help="ws(s):// or http(s):// URL of /v1/opamp")
    run.add_argument("--state-dir", required=True, type=Path, help="where identity and config live")
    run.add_argument(
        "--transport",
        choices=("ws", "http"),
        help="default: from the URL scheme (http/https poll over plain HTTP)",
    )
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
        "--header",
        action="append",
        type=parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="HTTP header sent with every request or upgrade, e.g. 'Authorization: Bearer X'",
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
    run.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: one line per poll is noise, not an event.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        transport = transport_for_url(options.server, kind=options.transport, headers=dict(options.header))
    except ValueError as error:
        build_parser().error(str(error))
    try:
        agent = Agent(
            transport=transport,
            state=FileState(options.state_dir),
            settings=settings_from_options(options),
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
    asyncio.run(run_until_signalled(agent))
    logger.info("stopped")
    return EXIT_OK
