"""Turn reported protobuf sub-messages into capped, JSON-safe documents for storage.

Everything an agent reports is untrusted. This is the boundary where it is made safe,
and every string goes through `cap_text`: NUL and lone surrogates become U+FFFD
(fleet.safe_text: PostgreSQL stores neither), then the length is capped. Nesting is cut at
a fixed depth, counts are bounded, and bytes are shown as text only when they are valid
UTF-8 without NUL (otherwise base64, so nothing is lost). The documents are what the
admin, the API and the pages show.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from fleet.safe_text import safe_text
from opamp.hashing import config_map_hash
from opamp.proto import anyvalue_pb2, opamp_pb2

TRUNCATED = "…[truncated]"


@dataclass(frozen=True)
class ReportLimits:
    max_value_chars: int = 4096
    max_attributes: int = 256
    max_depth: int = 8
    max_config_bytes: int = 1024 * 1024


def cap_text(text: str, limits: ReportLimits) -> str:
    """A reported string as it may be stored: unsafe characters replaced, length capped."""
    text = safe_text(text[: limits.max_value_chars + 1])
    if len(text) <= limits.max_value_chars:
        return text
    return text[: limits.max_value_chars] + TRUNCATED


def any_value_to_python(value: anyvalue_pb2.AnyValue, limits: ReportLimits, depth: int = 0) -> Any:
    """An AnyValue as a JSON value; nesting beyond the depth limit becomes a marker string."""
    if depth >= limits.max_depth:
        return f"[nesting deeper than {limits.max_depth} levels dropped]"
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return cap_text(value.string_value, limits)
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        number = value.double_value
        # NaN and infinities are not JSON; keep them readable instead of failing the write.
        if number != number or number in (float("inf"), float("-inf")):
            return str(number)
        return number
    if kind == "bytes_value":
        return {"base64": base64.b64encode(value.bytes_value[: limits.max_value_chars]).decode()}
    if kind == "array_value":
        return [
            any_value_to_python(item, limits, depth + 1) for item in value.array_value.values[: limits.max_attributes]
        ]
    if kind == "kvlist_value":
        return key_values_to_dict(value.kvlist_value.values, limits, depth + 1)
    return None


def key_values_to_dict(pairs: Any, limits: ReportLimits, depth: int = 0) -> dict[str, Any]:
    """Repeated KeyValue -> dict; the first occurrence of a key wins, counts are capped."""
    result: dict[str, Any] = {}
    for pair in pairs:
        if len(result) >= limits.max_attributes:
            break
        key = cap_text(pair.key, limits)
        if key not in result:
            result[key] = any_value_to_python(pair.value, limits, depth)
    return result


def health_to_dict(health: opamp_pb2.ComponentHealth, limits: ReportLimits, depth: int = 0) -> dict[str, Any]:
    document: dict[str, Any] = {
        "healthy": health.healthy,
        "status": cap_text(health.status, limits),
        "last_error": cap_text(health.last_error, limits),
        "start_time_unix_nano": health.start_time_unix_nano,
        "status_time_unix_nano": health.status_time_unix_nano,
    }
    if health.attributes:
        document["attributes"] = key_values_to_dict(health.attributes, limits, depth + 1)
    if health.component_health_map:
        if depth + 1 >= limits.max_depth:
            document["components_dropped"] = len(health.component_health_map)
        else:
            document["components"] = {
                cap_text(name, limits): health_to_dict(child, limits, depth + 1)
                for name, child in sorted(health.component_health_map.items())[: limits.max_attributes]
            }
    return document


def config_map_to_dict(config_map: opamp_pb2.AgentConfigMap, limits: ReportLimits) -> dict[str, Any]:
    """Files as text when they are UTF-8 without NUL, base64 otherwise; bodies past the cap are cut."""
    files: dict[str, Any] = {}
    budget = limits.max_config_bytes
    for name, file in sorted(config_map.config_map.items()):
        body = bytes(file.body)
        entry: dict[str, Any] = {"content_type": cap_text(file.content_type, limits), "size": len(body)}
        shown = body[: max(budget, 0)]
        budget -= len(shown)
        if len(shown) < len(body):
            entry["truncated"] = True
        try:
            text = shown.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            entry["body_base64"] = base64.b64encode(shown).decode()
        else:
            entry["body"] = text
        files[cap_text(name, limits)] = entry
    return files


def config_map_digest(config_map: opamp_pb2.AgentConfigMap) -> str:
    return config_map_hash(dict(config_map.config_map)).hex()


def package_statuses_to_dict(statuses: opamp_pb2.PackageStatuses, limits: ReportLimits) -> dict[str, Any]:
    packages = {}
    for name, status in sorted(statuses.packages.items())[: limits.max_attributes]:
        packages[cap_text(name, limits)] = {
            "agent_has_version": cap_text(status.agent_has_version, limits),
            "agent_has_hash": status.agent_has_hash.hex(),
            "server_offered_version": cap_text(status.server_offered_version, limits),
            "server_offered_hash": status.server_offered_hash.hex(),
            "status": opamp_pb2.PackageStatusEnum.Name(status.status).removeprefix("PackageStatusEnum_")
            if status.status in opamp_pb2.PackageStatusEnum.values()
            else str(status.status),
            "error_message": cap_text(status.error_message, limits),
        }
    return {
        "packages": packages,
        "server_provided_all_packages_hash": statuses.server_provided_all_packages_hash.hex(),
        "error_message": cap_text(statuses.error_message, limits),
    }


def components_to_dict(components: Any, limits: ReportLimits, depth: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, details in sorted(components.items())[: limits.max_attributes]:
        entry: dict[str, Any] = {"metadata": key_values_to_dict(details.metadata, limits, depth + 1)}
        if details.sub_component_map and depth + 1 < limits.max_depth:
            entry["components"] = components_to_dict(details.sub_component_map, limits, depth + 1)
        result[cap_text(name, limits)] = entry
    return result


def connection_settings_status_to_dict(
    status: opamp_pb2.ConnectionSettingsStatus, limits: ReportLimits
) -> dict[str, Any]:
    return {
        "last_connection_settings_hash": status.last_connection_settings_hash.hex(),
        "status": int(status.status),
        "error_message": cap_text(status.error_message, limits),
    }


@dataclass
class AgentReport:
    """The storable parts of one AgentToServer; None means "absent, unchanged"."""

    capabilities: int
    identifying_attributes: dict[str, Any] | None = None
    non_identifying_attributes: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    effective_config: dict[str, Any] | None = None
    effective_config_hash: str | None = None
    remote_config_hash: str | None = None
    remote_config_state: int | None = None
    remote_config_error: str | None = None
    package_statuses: dict[str, Any] | None = None
    available_components: dict[str, Any] | None = None
    available_components_hash: str | None = None
    custom_capabilities: list[str] | None = None
    connection_settings_status: dict[str, Any] | None = None

    @property
    def has_status(self) -> bool:
        """True when the message carried anything beyond a heartbeat."""
        return any(value is not None for name, value in vars(self).items() if name != "capabilities")


def report_from_message(message: opamp_pb2.AgentToServer, limits: ReportLimits, capabilities: int) -> AgentReport:
    report = AgentReport(capabilities=capabilities)
    if message.HasField("agent_description"):
        description = message.agent_description
        report.identifying_attributes = key_values_to_dict(description.identifying_attributes, limits)
        report.non_identifying_attributes = key_values_to_dict(description.non_identifying_attributes, limits)
    if message.HasField("health"):
        report.health = health_to_dict(message.health, limits)
    if message.HasField("effective_config"):
        config_map = message.effective_config.config_map
        report.effective_config = config_map_to_dict(config_map, limits)
        report.effective_config_hash = config_map_digest(config_map)
    if message.HasField("remote_config_status"):
        status = message.remote_config_status
        report.remote_config_hash = status.last_remote_config_hash.hex()[:64]
        report.remote_config_state = int(status.status) if status.status in (0, 1, 2, 3) else 0
        report.remote_config_error = cap_text(status.error_message, limits)
    if message.HasField("package_statuses"):
        report.package_statuses = package_statuses_to_dict(message.package_statuses, limits)
    if message.HasField("available_components"):
        components = message.available_components
        report.available_components_hash = components.hash.hex()[:64]
        if components.components:
            report.available_components = components_to_dict(components.components, limits)
    if message.HasField("custom_capabilities"):
        report.custom_capabilities = [
            cap_text(name, limits) for name in message.custom_capabilities.capabilities[: limits.max_attributes]
        ]
    if message.HasField("connection_settings_status"):
        report.connection_settings_status = connection_settings_status_to_dict(
            message.connection_settings_status, limits
        )
    return report
