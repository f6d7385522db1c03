"""The fleet's own parts in the OpAMP session, plugged in like any feature app's
(registered in `FleetConfig.ready`): commands (restart), custom messages and telemetry
connection settings."""

from __future__ import annotations

from collections.abc import Mapping

from fleet.command_contributor import CommandContributor
from fleet.connection_settings import labels_changing as telemetry_labels_changing
from fleet.connection_settings_contributor import TelemetrySettingsContributor
from fleet.custom_message_contributor import CustomMessageContributor
from fleet.extensions import FleetExtension
from fleet.models import Agent
from fleet.session_contributor import SessionContributor
from fleet.session_runtime import FleetRuntime


class CommandsExtension(FleetExtension):
    name = "commands"

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return CommandContributor(runtime)


class CustomMessagesExtension(FleetExtension):
    name = "custom messages"

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return CustomMessageContributor(runtime)


class TelemetrySettingsExtension(FleetExtension):
    name = "telemetry connection settings"

    def before_labels_change(self, *, agent: Agent, new_labels: Mapping[str, str]) -> None:
        telemetry_labels_changing(agent=agent, new_labels=new_labels)

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return TelemetrySettingsContributor(runtime)
