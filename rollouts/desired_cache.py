"""Each server process's cache of its agents' desired config, and how it stays true.

Answering a report needs the agent's desired config; reading it from the database on
every message would be one query per heartbeat. So each process keeps it per agent and
forgets exactly the agents whose assignment changed: every change of assignments moves
the desired-state generation and logs the agents it changed under the new value
(rollouts.desired_state.changes_since). A process reads the generation at most once per
`check_seconds` and, when it moved, the log since the value it knew.

Forgetting every agent on every change instead made each rollout step cost every
process one query per agent it serves (18,000 re-reads for a 1% canary stage), which
delayed reports by minutes and timed canaries out.

An entry is tagged with the generation known when its read started. A change logged
after that tag makes the entry stale even if the read finished after the change was
caught up with (`changed_at` remembers when each agent last changed), so a slow read
can never reinstate a superseded assignment.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from rollouts.desired_state import DesiredConfig, DesiredStateChanges

# Catching up from the log costs a second query only when the generation moved.
GENERATION_CHECK_SECONDS = 1.0
# Bounds `changed_at`; beyond it the process forgets everything once and starts over.
MAX_REMEMBERED_CHANGES = 1_000_000


@dataclass
class CachedDesired:
    generation: int  # known when the read started
    agent_id: int
    desired: DesiredConfig | None


@dataclass
class DesiredConfigCache:
    check_seconds: float = GENERATION_CHECK_SECONDS
    generation: int = -1  # nothing known yet: the first catch-up starts over
    checked_at: float = 0.0
    entries: dict[uuid.UUID, CachedDesired] = field(default_factory=dict)
    # Agent id -> the generation of its latest change seen by this process.
    changed_at: dict[int, int] = field(default_factory=dict)
    # Entries tagged before this are stale (set when the log could not be followed).
    valid_from: int = 0

    def check_due(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) - self.checked_at > self.check_seconds

    def expire(self) -> None:
        """Make the next lookup catch up first (this process just changed assignments)."""
        self.checked_at = 0.0

    def start_check(self, now: float | None = None) -> int:
        """Note that a catch-up is under way (others keep using the cache meanwhile, as
        they would for up to `check_seconds` anyway); the generation to catch up from."""
        self.checked_at = now if now is not None else time.monotonic()
        return self.generation

    def catch_up(self, changes: DesiredStateChanges) -> None:
        if changes.agent_ids is None or len(self.changed_at) + len(changes.agent_ids) > MAX_REMEMBERED_CHANGES:
            self.entries.clear()
            self.changed_at.clear()
            self.valid_from = changes.generation
        else:
            for agent_id in changes.agent_ids:
                self.changed_at[agent_id] = max(changes.generation, self.changed_at.get(agent_id, -1))
        # A slow catch-up may finish after a later one: never move back.
        self.generation = max(self.generation, changes.generation)

    def get(self, instance_uid: uuid.UUID) -> CachedDesired | None:
        """The entry if it is still true, else None (the caller reads and `put`s)."""
        entry = self.entries.get(instance_uid)
        if entry is None:
            return None
        if entry.generation < self.valid_from or self.changed_at.get(entry.agent_id, -1) > entry.generation:
            del self.entries[instance_uid]
            return None
        return entry

    def put(self, instance_uid: uuid.UUID, entry: CachedDesired) -> None:
        self.entries[instance_uid] = entry

    def forget(self, instance_uid: uuid.UUID) -> None:
        self.entries.pop(instance_uid, None)
