"""What an agent's message says about its state: the full-report rules, the reported-state
hash, and when the reply asks for more (ReportFullState, ReportAvailableComponents)."""

from __future__ import annotations

import hashlib

from fleet.reports import AgentReport
from fleet.services import AgentSnapshot
from opamp.capabilities import AgentCapabilities, ServerToAgentFlags, has_capability
from opamp.proto import opamp_pb2

# What a full report carries for each capability that promises it.
_FULL_REPORT_PARTS = (
    (AgentCapabilities.REPORTS_HEALTH, "health"),
    (AgentCapabilities.REPORTS_EFFECTIVE_CONFIG, "effective_config"),
    (AgentCapabilities.REPORTS_REMOTE_CONFIG, "remote_config_status"),
    (AgentCapabilities.REPORTS_PACKAGE_STATUSES, "package_statuses"),
    (AgentCapabilities.REPORTS_AVAILABLE_COMPONENTS, "available_components"),
)


def is_full_report(message: opamp_pb2.AgentToServer) -> bool:
    """True when the message carries the description and every part its capabilities promise.

    Such a message leaves nothing to ask for, so a new agent's first full report is not
    answered with ReportFullState (which would double the work of a reconnect storm).
    """
    if not message.HasField("agent_description"):
        return False
    return all(
        message.HasField(part)
        for capability, part in _FULL_REPORT_PARTS
        if has_capability(message.capabilities, capability)
    )


# The parts of an AgentToServer the agent's row stores, as `fleet.reports` reads them.
_STATE_FIELDS = (
    "agent_description",
    "health",
    "effective_config",
    "remote_config_status",
    "package_statuses",
    "custom_capabilities",
    "available_components",
    "connection_settings_status",
)
# Bumped when what a row stores for the same message changes (limits, documents).
_STATE_HASH_VERSION = b"opamp-reported-state/1"


def reported_state_hash(message: opamp_pb2.AgentToServer, capabilities: int) -> str:
    """SHA-256 of everything a full report makes the row hold: the capabilities and each
    stored part as deterministically serialized protobuf (no parsing into documents).

    Kept in the row (`Agent.reported_state_hash`), so a fresh process can tell a known
    agent's unchanged full report without reading, parsing or comparing the documents.
    """
    digest = hashlib.sha256(_STATE_HASH_VERSION)
    digest.update(capabilities.to_bytes(8, "big"))
    for name in _STATE_FIELDS:
        if message.HasField(name):
            part = getattr(message, name).SerializeToString(deterministic=True)
            digest.update(b"+%s:%d:" % (name.encode(), len(part)))
            digest.update(part)
        else:
            digest.update(b"-%s:" % name.encode())
    return digest.hexdigest()


def needs_full_state(message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot | None) -> bool:
    """Ask for everything when our picture of the agent may be incomplete or stale."""
    if is_full_report(message):
        return False  # whatever we missed, this message replaces it
    if snapshot is None:
        return True  # an agent the server holds no state for
    if message.sequence_num != snapshot.last_sequence_num + 1:
        return True  # a gap: some report may be missing (or the process restarted)
    # A snapshot loaded from the database may trail the agent by one heartbeat flush,
    # but reports are written before they are answered, so a contiguous sequence
    # number proves nothing was missed. What remains: a description never received.
    return not snapshot.description_received and not message.HasField("agent_description")


def _reported_components(message: opamp_pb2.AgentToServer) -> tuple[str | None, dict[str, object] | None]:
    """What `_should_ask_for_components` needs, read off the message without a report."""
    if not message.HasField("available_components"):
        return None, None
    components = message.available_components
    return components.hash.hex()[:64], ({} if components.components else None)


def _should_ask_for_components(
    capabilities: int, reported_hash: str | None, components: dict[str, object] | None
) -> bool:
    if not has_capability(capabilities, AgentCapabilities.REPORTS_AVAILABLE_COMPONENTS):
        return False
    return reported_hash is not None and components is None and bool(reported_hash)


_REPORT_FULL_STATE = int(ServerToAgentFlags.REPORT_FULL_STATE)
_REPORT_AVAILABLE_COMPONENTS = int(ServerToAgentFlags.REPORT_AVAILABLE_COMPONENTS)


def asked_flags(
    message: opamp_pb2.AgentToServer,
    report: AgentReport,
    capabilities: int,
    *,
    full_state: bool,
    unchanged: bool,
) -> int:
    """The ServerToAgent flags that ask the agent for more. `unchanged`: the message is a
    full report its row already holds, so `report` was not read off it."""
    flags = _REPORT_FULL_STATE if full_state else 0
    if unchanged:
        components_hash, components = _reported_components(message)
    else:
        components_hash, components = report.available_components_hash, report.available_components
    if _should_ask_for_components(capabilities, components_hash, components):
        flags |= _REPORT_AVAILABLE_COMPONENTS
    return flags
