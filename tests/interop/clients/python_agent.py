#!/usr/bin/env python3
"""Run the PyPI ``opentelemetry-opamp-client`` (plain HTTP) against a server.

Must run with the interpreter of tests/interop/clients/.venv-opamp-client (see
setup.sh): the package registers its own ``opamp.proto`` descriptors in protobuf's
default pool, so it never shares a process with the project's generated modules.

    .venv-opamp-client/bin/python python_agent.py --endpoint http://127.0.0.1:PORT/v1/opamp \
        --service-name NAME --instance-id ID [--heartbeat-seconds N] \
        [--fail-if-contains MARKER] [--header 'Name: value']... [--verbose]

Prints one JSON object per line on stdout (every line also carries "client" and
"ts"): started, sent, message, send_failed, remote_config, stopping, stopped.
The client's own log goes to stderr (warnings and up; everything with --verbose).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from importlib.metadata import version as dist_version
from typing import Any

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import MessageData, OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2
from opentelemetry._opamp.transport.requests import RequestsTransport

STATUS_NAMES = {0: "UNSET", 1: "APPLIED", 2: "APPLYING", 3: "FAILED"}

_out_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "client": "python", "ts": time.time(), **fields})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def summarize_a2s(a2s: opamp_pb2.AgentToServer) -> dict[str, Any]:
    rcs = a2s.remote_config_status if a2s.HasField("remote_config_status") else None
    return {
        "sequence_num": a2s.sequence_num,
        "instance_uid": a2s.instance_uid.hex(),
        "capabilities": a2s.capabilities,
        "flags": a2s.flags,
        "has_agent_description": a2s.HasField("agent_description"),
        "has_remote_config_status": rcs is not None,
        "remote_config_status": (
            {
                "status": STATUS_NAMES.get(rcs.status, rcs.status),
                "hash": rcs.last_remote_config_hash.hex(),
                "error_message": rcs.error_message,
            }
            if rcs is not None
            else None
        ),
        "has_effective_config": a2s.HasField("effective_config"),
        "has_health": a2s.HasField("health"),
        "agent_disconnect": a2s.HasField("agent_disconnect"),
    }


def summarize_s2a(s2a: opamp_pb2.ServerToAgent, own_uid: bytes) -> dict[str, Any]:
    rc = s2a.remote_config if s2a.HasField("remote_config") else None
    err = s2a.error_response if s2a.HasField("error_response") else None
    ident = s2a.agent_identification if s2a.HasField("agent_identification") else None
    cmd = s2a.command if s2a.HasField("command") else None
    return {
        "instance_uid": s2a.instance_uid.hex(),
        "instance_uid_matches": s2a.instance_uid == own_uid,
        "flags": s2a.flags,
        "capabilities": s2a.capabilities,
        "has_remote_config": rc is not None,
        "remote_config_hash": rc.config_hash.hex() if rc is not None else None,
        "remote_config_files": list(rc.config.config_map.keys()) if rc is not None else [],
        "has_error_response": err is not None,
        "error_type": err.type if err is not None else None,
        "error_message": err.error_message if err is not None else None,
        "new_instance_uid": ident.new_instance_uid.hex() if ident is not None else None,
        "has_command": cmd is not None,
        "command_type": cmd.type if cmd is not None else None,
        "has_connection_settings": s2a.HasField("connection_settings"),
        "has_packages_available": s2a.HasField("packages_available"),
        "has_custom_capabilities": s2a.HasField("custom_capabilities"),
        "has_custom_message": s2a.HasField("custom_message"),
    }


class LoggingTransport(RequestsTransport):
    """The client's own requests transport, plus a JSON line per exchange.

    Callbacks only ever see remote config, so this is where the whole
    ServerToAgent (flags, error_response, agent_identification, ...) is visible.
    """

    disconnect_acknowledged = False

    def send(self, *, data: bytes, **kwargs: Any) -> opamp_pb2.ServerToAgent:
        a2s = opamp_pb2.AgentToServer()
        a2s.ParseFromString(data)
        emit("sent", **summarize_a2s(a2s))
        try:
            s2a = super().send(data=data, **kwargs)
        except Exception as exc:
            emit("send_failed", sequence_num=a2s.sequence_num, error=str(exc), retry_after_ms=None)
            raise
        emit("message", **summarize_s2a(s2a, a2s.instance_uid))
        if a2s.HasField("agent_disconnect"):
            self.disconnect_acknowledged = True
        return s2a


class RunnerCallbacks(OpAMPCallbacks):
    def __init__(self, fail_marker: str | None) -> None:
        self._fail_marker = fail_marker

    def on_message(self, agent: OpAMPAgent, client: OpAMPClient, message: MessageData) -> None:
        rc = message.remote_config
        if rc is None:
            return
        files = rc.config.config_map
        status = opamp_pb2.RemoteConfigStatuses_APPLIED
        error_message = ""
        if self._fail_marker is not None:
            needle = self._fail_marker.encode("utf-8")
            for name, f in files.items():
                if needle in f.body:
                    status = opamp_pb2.RemoteConfigStatuses_FAILED
                    error_message = f"config file '{name}' contains marker '{self._fail_marker}'"
                    break

        if status == opamp_pb2.RemoteConfigStatuses_APPLIED:
            _set_effective_config(client, files)

        # Returns the new RemoteConfigStatus only when hash/status/message changed.
        changed = client.update_remote_config_status(
            remote_config_hash=rc.config_hash,
            status=status,
            error_message=error_message,
        )
        if changed is not None:
            agent.send(client.build_remote_config_status_response_message(changed))
        emit(
            "remote_config",
            hash=rc.config_hash.hex(),
            files=[{"name": name, "content_type": f.content_type, "size": len(f.body)} for name, f in files.items()],
            status=STATUS_NAMES[status],
            error_message=error_message,
            reported=changed is not None,
            report_error=None,
        )

    def on_error(self, agent: OpAMPAgent, client: OpAMPClient, error_response: opamp_pb2.ServerErrorResponse) -> None:
        # Also visible in the "message" line; kept for the client's own view.
        logging.getLogger("python_agent").warning(
            "server error_response type=%s message=%s", error_response.type, error_response.error_message
        )


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"log": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _set_effective_config(client: OpAMPClient, files: Mapping[str, opamp_pb2.AgentConfigFile]) -> None:
    """Record the applied config as effective config.

    This client only sends effective_config inside a full-state report (its
    first message or after ReportFullState), and takes a single content type.
    """
    content_types = {f.content_type for f in files.values()}
    content_type = content_types.pop() if len(content_types) == 1 else "application/octet-stream"
    config: dict[str, Any] = {}
    for name, f in files.items():
        if content_type == "application/json":
            try:
                config[name] = json.loads(f.body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                content_type = "application/octet-stream"
                config = {n: g.body for n, g in files.items()}
                break
        else:
            config[name] = f.body
    client.update_effective_config(config, content_type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--service-name", required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--heartbeat-seconds", type=float, default=1.0)
    parser.add_argument("--fail-if-contains", default=None)
    parser.add_argument("--header", action="append", default=[], help="extra HTTP header 'Name: value' (repeatable)")
    parser.add_argument("--timeout-ms", type=int, default=5000, help="HTTP timeout per request (client default: 1000)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.heartbeat_seconds <= 0:
        parser.error("--heartbeat-seconds must be > 0")
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header must look like 'Name: value', got {h!r}")
        headers[name.strip()] = value.strip()

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLogFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler])

    transport = LoggingTransport()
    client = OpAMPClient(
        endpoint=args.endpoint,
        headers=headers,
        timeout_millis=args.timeout_ms,
        agent_identifying_attributes={
            "service.name": args.service_name,
            "service.instance.id": args.instance_id,
        },
        agent_non_identifying_attributes={
            "host.name": socket.gethostname(),
            # A Python int: this client sends it as AnyValue.int_value.
            "process.pid": os.getpid(),
        },
        transport=transport,
    )
    agent = OpAMPAgent(
        interval=args.heartbeat_seconds,
        callbacks=RunnerCallbacks(args.fail_if_contains),
        client=client,
    )

    stop_requested = threading.Event()
    received: dict[str, str | None] = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        received["signal"] = signal.Signals(signum).name
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    emit(
        "started",
        client_version=dist_version("opentelemetry-opamp-client"),
        instance_uid=client._instance_uid.hex(),  # no public accessor
        endpoint=args.endpoint,
        service_name=args.service_name,
        instance_id=args.instance_id,
        heartbeat_seconds=args.heartbeat_seconds,
        capabilities=client._capabilities,
        fail_if_contains=args.fail_if_contains,
    )
    agent.start()
    # start() registers stop() with atexit; we stop explicitly, and a second
    # stop() would send a second AgentDisconnect.
    atexit.unregister(agent.stop)

    while not stop_requested.wait(0.2):
        pass

    emit("stopping", signal=received["signal"])
    # stop() sends AgentDisconnect synchronously (through the transport, so a
    # "sent" line with agent_disconnect=true shows up), then joins the threads.
    agent.stop(timeout=5)
    emit("stopped", disconnect_sent=transport.disconnect_acknowledged, clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
