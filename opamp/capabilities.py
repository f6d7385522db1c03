"""Capability and flag bit masks, and helpers to read them.

Each member takes its value from the generated enum, so the numbers live in one place
(opamp.proto); the classes exist so code reads `AgentCapabilities.ACCEPTS_REMOTE_CONFIG`
and type-checks. Undefined bits an agent sets are ignored: `known_agent_capabilities`
masks them away before anything is stored or trusted.
"""

from __future__ import annotations

from enum import IntFlag

from opamp.proto import opamp_pb2 as pb


class AgentCapabilities(IntFlag):
    REPORTS_STATUS = pb.AgentCapabilities_ReportsStatus
    ACCEPTS_REMOTE_CONFIG = pb.AgentCapabilities_AcceptsRemoteConfig
    REPORTS_EFFECTIVE_CONFIG = pb.AgentCapabilities_ReportsEffectiveConfig
    ACCEPTS_PACKAGES = pb.AgentCapabilities_AcceptsPackages
    REPORTS_PACKAGE_STATUSES = pb.AgentCapabilities_ReportsPackageStatuses
    REPORTS_OWN_TRACES = pb.AgentCapabilities_ReportsOwnTraces
    REPORTS_OWN_METRICS = pb.AgentCapabilities_ReportsOwnMetrics
    REPORTS_OWN_LOGS = pb.AgentCapabilities_ReportsOwnLogs
    ACCEPTS_OPAMP_CONNECTION_SETTINGS = pb.AgentCapabilities_AcceptsOpAMPConnectionSettings
    ACCEPTS_OTHER_CONNECTION_SETTINGS = pb.AgentCapabilities_AcceptsOtherConnectionSettings
    ACCEPTS_RESTART_COMMAND = pb.AgentCapabilities_AcceptsRestartCommand
    REPORTS_HEALTH = pb.AgentCapabilities_ReportsHealth
    REPORTS_REMOTE_CONFIG = pb.AgentCapabilities_ReportsRemoteConfig
    REPORTS_HEARTBEAT = pb.AgentCapabilities_ReportsHeartbeat
    REPORTS_AVAILABLE_COMPONENTS = pb.AgentCapabilities_ReportsAvailableComponents
    REPORTS_CONNECTION_SETTINGS_STATUS = pb.AgentCapabilities_ReportsConnectionSettingsStatus


class ServerCapabilities(IntFlag):
    ACCEPTS_STATUS = pb.ServerCapabilities_AcceptsStatus
    OFFERS_REMOTE_CONFIG = pb.ServerCapabilities_OffersRemoteConfig
    ACCEPTS_EFFECTIVE_CONFIG = pb.ServerCapabilities_AcceptsEffectiveConfig
    OFFERS_PACKAGES = pb.ServerCapabilities_OffersPackages
    ACCEPTS_PACKAGES_STATUS = pb.ServerCapabilities_AcceptsPackagesStatus
    OFFERS_CONNECTION_SETTINGS = pb.ServerCapabilities_OffersConnectionSettings
    ACCEPTS_CONNECTION_SETTINGS_REQUEST = pb.ServerCapabilities_AcceptsConnectionSettingsRequest


class AgentToServerFlags(IntFlag):
    REQUEST_INSTANCE_UID = pb.AgentToServerFlags_RequestInstanceUid


class ServerToAgentFlags(IntFlag):
    REPORT_FULL_STATE = pb.ServerToAgentFlags_ReportFullState
    REPORT_AVAILABLE_COMPONENTS = pb.ServerToAgentFlags_ReportAvailableComponents


ALL_AGENT_CAPABILITIES = int(sum(AgentCapabilities))
ALL_SERVER_CAPABILITIES = int(sum(ServerCapabilities))


def known_agent_capabilities(bits: int) -> int:
    """The agent's capability bits with every undefined bit cleared."""
    return bits & ALL_AGENT_CAPABILITIES


def has_capability(bits: int, capability: int) -> bool:
    return bits & capability == capability


def agent_capability_names(bits: int) -> list[str]:
    """Names of the defined capabilities set in `bits`, in bit order (lower snake case)."""
    return [member.name.lower() for member in AgentCapabilities if member.name and bits & member]
