"""The sub-messages of an agent's status report, built from plain Python values."""

from __future__ import annotations

from collections.abc import Mapping

from agent_client.managed_process import ProcessHealth
from agent_client.remote_config import ConfigFile
from agent_client.state import RemoteConfigRecord
from opamp.proto import anyvalue_pb2
from opamp.proto import opamp_pb2 as pb

HEALTH_STATUS_RUNNING = "running"
# The managed process's pid, as OpenTelemetry's semantic conventions name it.
PROCESS_PID = "process.pid"


def key_values(attributes: Mapping[str, str]) -> list[anyvalue_pb2.KeyValue]:
    """String attributes as KeyValues, sorted by key so equal descriptions encode equally."""
    return [
        anyvalue_pb2.KeyValue(key=key, value=anyvalue_pb2.AnyValue(string_value=value))
        for key, value in sorted(attributes.items())
    ]


def agent_description(identifying: Mapping[str, str], non_identifying: Mapping[str, str]) -> pb.AgentDescription:
    return pb.AgentDescription(
        identifying_attributes=key_values(identifying),
        non_identifying_attributes=key_values(non_identifying),
    )


def component_health(*, start_time_unix_nano: int) -> pb.ComponentHealth:
    # Nothing changes the status after start-up, so the status dates from the start.
    return pb.ComponentHealth(
        healthy=True,
        start_time_unix_nano=start_time_unix_nano,
        status=HEALTH_STATUS_RUNNING,
        status_time_unix_nano=start_time_unix_nano,
    )


def process_health(health: ProcessHealth) -> pb.ComponentHealth:
    """An agent's health when it runs a managed process: the process's."""
    message = pb.ComponentHealth(
        healthy=health.healthy,
        start_time_unix_nano=health.start_time_unix_nano,
        last_error=health.last_error,
        status=health.status,
        status_time_unix_nano=health.status_time_unix_nano,
    )
    if health.pid is not None:
        pid = anyvalue_pb2.AnyValue(int_value=health.pid)
        message.attributes.append(anyvalue_pb2.KeyValue(key=PROCESS_PID, value=pid))
    return message


def config_map(files: Mapping[str, ConfigFile]) -> pb.AgentConfigMap:
    result = pb.AgentConfigMap()
    for name, file in files.items():
        result.config_map[name].CopyFrom(pb.AgentConfigFile(body=file.body, content_type=file.content_type))
    return result


def config_files(message: pb.AgentConfigMap) -> dict[str, ConfigFile]:
    return {
        name: ConfigFile(body=file.body, content_type=file.content_type) for name, file in message.config_map.items()
    }


def effective_config(files: Mapping[str, ConfigFile]) -> pb.EffectiveConfig:
    return pb.EffectiveConfig(config_map=config_map(files))


def remote_config_status(record: RemoteConfigRecord) -> pb.RemoteConfigStatus:
    return pb.RemoteConfigStatus(
        last_remote_config_hash=record.last_hash,
        status=record.status,
        error_message=record.error_message,
    )
