"""Custom messages in the OpAMP session: agents' messages kept, operators' queued ones given.

A ServerToAgent holds one custom message. The server's own go first (signing's renewal
request, `ReplyPart.CUSTOM_MESSAGE`); an operator's queued message takes the slot only when
it is still free (`ReplyPart.QUEUED_CUSTOM_MESSAGE`), one per reply, oldest first, so a
queue of several drains over the following replies. A live WebSocket session is hinted
(`custom`) and pushes it at once; a polling agent gets it in the reply to its next message.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from django.utils import timezone

from fleet.custom_messages import agents_with_queued_custom_messages, custom_message_claim, custom_message_record
from fleet.db import db
from fleet.hint_messages import HintKind
from fleet.pending_deliveries import PendingAgents
from fleet.services import AgentSnapshot
from fleet.session_contributor import ReplyFiller, ReplyPart, ReportStep, SessionContributor
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.session import AgentSession
    from fleet.session_runtime import FleetRuntime


class CustomMessageContributor(SessionContributor):
    name = "custom messages"
    hint_kinds = (HintKind.CUSTOM,)

    def __init__(self, runtime: FleetRuntime) -> None:
        self.pending = PendingAgents(agents_with_queued_custom_messages)

    def report_steps(self) -> Sequence[tuple[str, ReportStep]]:
        return (("custom_message", self.keep_agent_message),)

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return ((ReplyPart.QUEUED_CUSTOM_MESSAGE, self.give_queued_message),)

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        self.pending.add(snapshot.agent_id)

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        self.pending.expire()

    async def keep_agent_message(
        self, session: AgentSession, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot
    ) -> None:
        sent = message.custom_message
        if not sent.capability:
            return
        await db(custom_message_record)(
            agent_id=snapshot.agent_id,
            capability=sent.capability,
            type=sent.type,
            data=bytes(sent.data),
            now=timezone.now(),
        )

    async def give_queued_message(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        if not snapshot.custom_capabilities or reply.HasField("custom_message"):
            return False
        await self.pending.refresh_if_due()
        if snapshot.agent_id not in self.pending:
            return False
        queued = await db(custom_message_claim)(
            agent_id=snapshot.agent_id, capabilities=list(snapshot.custom_capabilities), now=timezone.now()
        )
        if queued is None:
            self.pending.discard(snapshot.agent_id)
            return False
        reply.custom_message.capability = queued.capability
        reply.custom_message.type = queued.type
        reply.custom_message.data = bytes(queued.data)
        return True
