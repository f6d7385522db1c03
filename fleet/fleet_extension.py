"""The fleet's own parts in the OpAMP session, plugged in like any feature app's
(registered in `FleetConfig.ready`): commands (restart) and custom messages."""

from __future__ import annotations

from fleet.command_contributor import CommandContributor
from fleet.custom_message_contributor import CustomMessageContributor
from fleet.extensions import FleetExtension
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
