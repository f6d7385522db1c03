"""`AgentSettings`: how an agent describes itself and behaves, and the capabilities it declares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_client.enrollment import EnrollmentSettings
from agent_client.managed_process import ManagedProcessSettings
from agent_client.packages import PackageSettings
from opamp.capabilities import AgentCapabilities
from opamp.config_signature import CUSTOM_CAPABILITY as SIGNED_CONFIG_CAPABILITY
from opamp.config_signature import key_id_for

DEFAULT_HEARTBEAT_INTERVAL = 30.0

_ALWAYS_DECLARED = (
    AgentCapabilities.REPORTS_STATUS
    | AgentCapabilities.REPORTS_EFFECTIVE_CONFIG
    | AgentCapabilities.REPORTS_HEALTH
    | AgentCapabilities.REPORTS_REMOTE_CONFIG
    | AgentCapabilities.REPORTS_HEARTBEAT
)

_CONNECTION_SETTINGS = (
    AgentCapabilities.REPORTS_OWN_METRICS
    | AgentCapabilities.REPORTS_OWN_TRACES
    | AgentCapabilities.REPORTS_OWN_LOGS
    | AgentCapabilities.ACCEPTS_OTHER_CONNECTION_SETTINGS
    | AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
    | AgentCapabilities.REPORTS_CONNECTION_SETTINGS_STATUS
)


@dataclass(frozen=True)
class AgentSettings:
    """How an agent describes itself and behaves; shared freely between simulated agents."""

    identifying_attributes: Mapping[str, str] = field(default_factory=dict)
    non_identifying_attributes: Mapping[str, str] = field(default_factory=dict)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    accept_remote_config: bool = True
    fail_if_contains: bytes | None = None
    fail_apply: bool = False
    # Drill: seconds an apply takes (the agent reports APPLYING meanwhile), as a real
    # collector restart would.
    apply_delay: float = 0.0
    # Declares AcceptsRestartCommand: a Restart command restarts the managed process, or,
    # without one, ends the session and the agent comes back as a new process would
    # (agent_client.agent).
    accept_restart: bool = True
    # Drill: seconds a restart keeps the agent away, as a real process's start-up would.
    restart_delay: float = 0.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    shutdown_timeout: float = 5.0
    # Key id -> Ed25519 public key. None: signatures are not required. Otherwise the agent
    # declares the signed-config custom capability and applies only configs signed by one
    # of these keys (an empty mapping refuses every config).
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None
    # Declares the telemetry connection settings capabilities and applies what the server
    # offers (agent_client.agent_connection_settings).
    accept_connection_settings: bool = False
    # Used only by agents given a CredentialStore (certificate enrollment).
    enrollment: EnrollmentSettings = field(default_factory=EnrollmentSettings)
    # A refused credential (401/403) does not fix itself in a second: retry no sooner.
    refused_credential_delay: float = 10.0
    # Declares AcceptsPackages and ReportsPackageStatuses (agent_client.agent_packages);
    # installed packages are signed by one of `trusted_keys`.
    packages: PackageSettings | None = None
    # Supervisor mode: the process the agent runs and keeps running (agent_client.agent_managed).
    managed: ManagedProcessSettings | None = None

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.refused_credential_delay < 0:
            raise ValueError("refused_credential_delay must not be negative")
        if self.apply_delay < 0:
            raise ValueError("apply_delay must not be negative")
        if self.restart_delay < 0:
            raise ValueError("restart_delay must not be negative")
        if self.managed is not None and self.managed.package is not None and self.packages is None:
            raise ValueError("the managed process runs from a package, but the agent accepts no packages")
        for key_id, key in (self.trusted_keys or {}).items():
            if key_id != key_id_for(key):
                raise ValueError(f"trusted key {key_id!r} is filed under the wrong id (its id is {key_id_for(key)})")

    @property
    def requires_signed_config(self) -> bool:
        return self.trusted_keys is not None

    @property
    def custom_capabilities(self) -> list[str]:
        """The custom capabilities declared in full reports."""
        return [SIGNED_CONFIG_CAPABILITY] if self.requires_signed_config else []

    @property
    def capabilities(self) -> int:
        bits = _ALWAYS_DECLARED
        if self.accept_remote_config:
            bits |= AgentCapabilities.ACCEPTS_REMOTE_CONFIG
        if self.accept_restart:
            bits |= AgentCapabilities.ACCEPTS_RESTART_COMMAND
        if self.packages is not None:
            bits |= AgentCapabilities.ACCEPTS_PACKAGES | AgentCapabilities.REPORTS_PACKAGE_STATUSES
        if self.accept_connection_settings:
            bits |= _CONNECTION_SETTINGS
        return int(bits)
