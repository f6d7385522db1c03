"""The WebSocket sessions of this server process, by instance_uid."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.session import AgentSession


@dataclass
class LiveConnections:
    """WebSocket sessions of this process by instance_uid: to spot duplicates, and where
    the process's hint stream (fleet.hints) finds the sessions a hint names."""

    by_uid: dict[uuid.UUID, AgentSession] = field(default_factory=dict)
    # Set by the hint stream: announces a session that became an agent's live one here.
    on_claim: Callable[[uuid.UUID, AgentSession], None] | None = None

    def claim(self, instance_uid: uuid.UUID, session: AgentSession) -> AgentSession | None:
        """Register `session` for the uid; return the other live session holding it, if any."""
        holder = self.by_uid.get(instance_uid)
        if holder is not None and holder is not session and not holder.closed:
            return holder
        self.by_uid[instance_uid] = session
        if holder is not session:
            session.claimed_at = time.time()
            if self.on_claim is not None:
                self.on_claim(instance_uid, session)
        return None

    def release(self, instance_uid: uuid.UUID, session: AgentSession) -> None:
        if self.by_uid.get(instance_uid) is session:
            del self.by_uid[instance_uid]
