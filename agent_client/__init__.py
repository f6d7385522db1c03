"""A pure-Python OpAMP agent: library, command line (`python -m agent_client`) and fleet simulator.

It depends on the standard library, `opamp` (protocol messages, codec, config signatures;
protobuf through it), `cryptography` (keys, certificate requests, signature checks),
`websockets` and `httpx`; never on Django or the server's apps (`fleet`, `rollouts`,
`signing`, `opamp_site`), so it runs anywhere an agent would.

    agent = Agent(
        transport=transport_for_url("ws://127.0.0.1:4320/v1/opamp"),
        state=FileState("/var/lib/my-agent"),
        settings=AgentSettings(identifying_attributes={"service.name": "edge"}),
    )
    await agent.run()  # until agent.stop()

With `credentials=CredentialStore(state_dir)` (and `AgentSettings(enrollment=EnrollmentSettings(
token=...))`) the agent enrolls for a TLS client certificate and presents it from then on.
With `AgentSettings(packages=PackageSettings(directory=...), trusted_keys=...)` it installs
the signed packages the server offers. With `AgentSettings(managed=ManagedProcessSettings(
command=(...), package=...))` it runs in supervisor mode: it runs that process, reports it as
its health, restarts it on a Restart command, an applied config and a new version of the
package it runs from, and switches that package back when the process does not start on it
(`agent_client.agent_managed`).
"""

from __future__ import annotations

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.backoff import Backoff
from agent_client.credentials import CredentialStore
from agent_client.enrollment import EnrollmentEvent, EnrollmentSettings
from agent_client.managed_process import ManagedProcessSettings
from agent_client.packages import PackageSettings
from agent_client.remote_config import ConfigFile, ConfigRejected
from agent_client.simulator import Fleet, FleetStats
from agent_client.state import (
    AgentState,
    FileState,
    MemoryState,
    RemoteConfigRecord,
    StateError,
)
from agent_client.transport import (
    CredentialRefused,
    HttpTransport,
    Transport,
    TransportError,
    WebSocketTransport,
    transport_for_url,
)
from agent_client.version import __version__

__all__ = [
    "Agent",
    "AgentObserver",
    "AgentSettings",
    "AgentState",
    "Backoff",
    "ConfigFile",
    "ConfigRejected",
    "CredentialRefused",
    "CredentialStore",
    "EnrollmentEvent",
    "EnrollmentSettings",
    "FileState",
    "Fleet",
    "FleetStats",
    "HttpTransport",
    "ManagedProcessSettings",
    "MemoryState",
    "PackageSettings",
    "RemoteConfigRecord",
    "StateError",
    "Transport",
    "TransportError",
    "WebSocketTransport",
    "__version__",
    "transport_for_url",
]
