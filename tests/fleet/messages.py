"""Builders for AgentToServer messages used across the fleet tests."""

from __future__ import annotations

from typing import Any

from opamp.proto import opamp_pb2

BASE_CAPABILITIES = 0x1 | 0x2 | 0x4 | 0x800 | 0x1000 | 0x2000


def full_report(
    uid: bytes,
    seq: int,
    *,
    service: str = "checkout",
    capabilities: int = BASE_CAPABILITIES,
    healthy: bool = True,
    extra_identifying: dict[str, Any] | None = None,
) -> opamp_pb2.AgentToServer:
    message = opamp_pb2.AgentToServer(instance_uid=uid, sequence_num=seq, capabilities=capabilities)
    identifying = {"service.name": service, "service.instance.id": uid.hex(), **(extra_identifying or {})}
    for key, value in identifying.items():
        kv = message.agent_description.identifying_attributes.add()
        kv.key = key
        if isinstance(value, bool):
            kv.value.bool_value = value
        elif isinstance(value, int):
            kv.value.int_value = value
        else:
            kv.value.string_value = str(value)
    host = message.agent_description.non_identifying_attributes.add()
    host.key, host.value.string_value = "host.name", "node-1"
    message.health.healthy = healthy
    message.health.status = "running" if healthy else "degraded"
    message.health.component_health_map["receiver/otlp"].healthy = healthy
    message.effective_config.config_map.config_map[""].body = b"receivers: {}\n"
    message.effective_config.config_map.config_map[""].content_type = "text/yaml"
    message.remote_config_status.SetInParent()  # nothing applied yet: an UNSET status
    return message


def heartbeat(uid: bytes, seq: int, *, capabilities: int = BASE_CAPABILITIES) -> opamp_pb2.AgentToServer:
    return opamp_pb2.AgentToServer(instance_uid=uid, sequence_num=seq, capabilities=capabilities)


def config_status(uid: bytes, seq: int, config_hash: str, state: int, error: str = "") -> opamp_pb2.AgentToServer:
    """A heartbeat carrying a RemoteConfigStatus about `config_hash` (hex)."""
    message = heartbeat(uid, seq)
    message.remote_config_status.last_remote_config_hash = bytes.fromhex(config_hash)
    message.remote_config_status.status = state
    message.remote_config_status.error_message = error
    return message
