"""Commands in the OpAMP session: a waiting restart goes to its agent once.

The protocol wants `ServerToAgent.command` alone: "This field must not be set with other
fields besides instance_uid or capabilities" (the agent ignores everything else). So the
command is the last part of a reply (`ReplyPart.COMMAND`) and is given only when every
other contributor left the reply empty (and no flag is set); otherwise it waits for the
next reply, which the agent's answer to this one, or its next heartbeat or poll, brings.
A live WebSocket session is hinted (`command`) and pushes it at once; a polling agent gets
it in the reply to its next message. Only agents that still declare AcceptsRestartCommand
get one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from django.utils import timezone

from fleet.commands import agents_with_pending_commands, command_claim
from fleet.db import db
from fleet.hint_messages import HintKind
from fleet.pending_deliveries import PendingAgents
from fleet.services import AgentSnapshot
from fleet.session_contributor import ReplyFiller, ReplyPart, SessionContributor
from opamp.capabilities import AgentCapabilities, has_capability
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.session import AgentSession
    from fleet.session_runtime import FleetRuntime

# What may travel beside a command.
_BESIDE_A_COMMAND = frozenset({"instance_uid", "capabilities"})


def alone_so_far(reply: opamp_pb2.ServerToAgent) -> bool:
    """Whether the reply holds nothing but what may go with a command."""
    return all(descriptor.name in _BESIDE_A_COMMAND for descriptor, _ in reply.ListFields())


class CommandContributor(SessionContributor):
    name = "commands"
    hint_kinds = (HintKind.COMMAND,)

    def __init__(self, runtime: FleetRuntime) -> None:
        self.pending = PendingAgents(agents_with_pending_commands)

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return ((ReplyPart.COMMAND, self.give_command),)

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        self.pending.add(snapshot.agent_id)

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        self.pending.expire()  # polling agents of this process find it on their next poll

    async def give_command(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        if not has_capability(snapshot.capabilities, AgentCapabilities.ACCEPTS_RESTART_COMMAND):
            return False
        await self.pending.refresh_if_due()
        if snapshot.agent_id not in self.pending or not alone_so_far(reply):
            return False
        command = await db(command_claim)(agent_id=snapshot.agent_id, now=timezone.now())
        if command is None:
            self.pending.discard(snapshot.agent_id)
            return False
        # Restart is 0, the default: the sub-message must still be present on the wire.
        reply.command.SetInParent()
        reply.command.type = opamp_pb2.CommandType_Restart
        return True
