"""The agent's side of telemetry connection settings: applied, written out, reported.

With `AgentSettings.accept_connection_settings` the agent declares ReportsOwnMetrics /
Traces / Logs, AcceptsOtherConnectionSettings, AcceptsOpAMPConnectionSettings and
ReportsConnectionSettingsStatus. An offer that carries own_* destinations, other
connections or OpAMP settings without a certificate (a heartbeat interval) is applied here:
the destinations are written, atomically, as JSON to `connection-settings.json` in the state
directory (where a supervisor hands them to the collector it manages), and the agent reports
APPLYING, then APPLIED or FAILED with the error, with the offer's hash. A part the offer
leaves out keeps its previous value, as the protocol says. The heartbeat interval itself is
adopted by the session (agent_client.agent), like the one a certificate offer carries. An
offer with the hash already applied is not applied again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent_client.agent_base import AgentBase
from agent_client.state import FileState, write_atomically
from opamp.proto import opamp_pb2 as pb

SETTINGS_FILE = "connection-settings.json"
OWN_FIELDS = ("own_metrics", "own_traces", "own_logs")


def _destination(settings: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"destination_endpoint": settings.destination_endpoint}
    if settings.headers.headers:
        document["headers"] = {header.key: header.value for header in settings.headers.headers}
    if settings.HasField("tls"):
        document["tls"] = {
            "ca_pem": settings.tls.ca_pem_contents,
            "insecure_skip_verify": settings.tls.insecure_skip_verify,
            "include_system_ca_certs_pool": settings.tls.include_system_ca_certs_pool,
        }
    if getattr(settings, "other_settings", None):
        document["other_settings"] = dict(settings.other_settings)
    return document


def carries_settings(offers: pb.ConnectionSettingsOffers) -> bool:
    """Whether the offer holds anything this module applies (not a certificate alone)."""
    return (
        any(offers.HasField(name) for name in OWN_FIELDS)
        or bool(offers.other_connections)
        or (offers.HasField("opamp") and not offers.opamp.certificate.cert)
    )


class ConnectionSettingsHandling(AgentBase):
    """Telemetry connection settings for `agent_client.agent.Agent`; inert unless accepted."""

    @property
    def applied_connection_settings(self) -> dict[str, Any]:
        """The destinations in use (own_* and other_connections), as written for the collector."""
        return self._telemetry_settings

    def _settings_path(self) -> Path | None:
        state = self._state
        return state.directory / SETTINGS_FILE if isinstance(state, FileState) else None

    def _load_connection_settings(self) -> None:
        """At start: what an earlier run applied, and the status it reported."""
        self._telemetry_settings: dict[str, Any] = {}
        path = self._settings_path()
        if path is None or not path.exists():
            return
        try:
            document = json.loads(path.read_text())
            self._telemetry_settings = dict(document["settings"])
            self._settings_status = pb.ConnectionSettingsStatus(
                last_connection_settings_hash=bytes.fromhex(document["hash"]),
                status=pb.ConnectionSettingsStatuses_APPLIED,
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._log.warning("ignoring %s: %s", path, error)

    async def _on_telemetry_settings(self, offers: pb.ConnectionSettingsOffers) -> None:
        if not self.settings.accept_connection_settings:
            return
        if not carries_settings(offers):
            if self._enrollment is not None:
                self._settings_status = None  # a certificate alone: enrollment reports on it
            return
        current = self._settings_status
        if offers.hash and current is not None and current.last_connection_settings_hash == offers.hash:
            return
        self._settings_status = pb.ConnectionSettingsStatus(
            last_connection_settings_hash=offers.hash, status=pb.ConnectionSettingsStatuses_APPLYING
        )
        await self._send_report(connection_settings_status=True)
        updated = dict(self._telemetry_settings)
        for name in OWN_FIELDS:
            if offers.HasField(name):
                updated[name] = _destination(getattr(offers, name))
        if offers.other_connections:
            updated["other_connections"] = {
                name: _destination(settings) for name, settings in sorted(offers.other_connections.items())
            }
        try:
            self._write_connection_settings(updated, offers.hash)
        except OSError as error:
            detail = f"could not write the connection settings: {error}"
            self._log.warning("%s", detail)
            self._settings_status = pb.ConnectionSettingsStatus(
                last_connection_settings_hash=offers.hash,
                status=pb.ConnectionSettingsStatuses_FAILED,
                error_message=detail,
            )
        else:
            self._telemetry_settings = updated
            self._settings_status = pb.ConnectionSettingsStatus(
                last_connection_settings_hash=offers.hash, status=pb.ConnectionSettingsStatuses_APPLIED
            )
            self._log.info("applied connection settings %s", offers.hash.hex()[:16])
        await self._send_report(connection_settings_status=True)

    def _write_connection_settings(self, settings: dict[str, Any], offer_hash: bytes) -> None:
        path = self._settings_path()
        if path is None:
            return
        document = {"hash": offer_hash.hex(), "settings": settings}
        write_atomically(path, json.dumps(document, indent=2, sort_keys=True).encode())
