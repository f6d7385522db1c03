"""The messages of the refusals rollouts raise as `fleet.errors.DomainError` (tests assert on these)."""

from __future__ import annotations

CONFIGURATION_NAME_TAKEN = "a configuration named {name!r} already exists"
NO_SUCH_VERSION = "configuration {name!r} has no version {number}"
ROLLBACK_TO_CURRENT = "version {number} already has the current content; nothing to roll back"
ROLLOUT_IN_PROGRESS = (
    "configuration {name!r} has an active rollout ({rollout_id}); finish or abort it before making another "
    "version current, or publish the version as a rollout candidate"
)
