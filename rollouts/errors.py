"""The one domain error type, and the messages it carries (tests assert on these)."""

from __future__ import annotations


class DomainError(Exception):
    """A request that cannot be carried out as asked; mapped to HTTP 400 by the API."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


CONFIGURATION_NAME_TAKEN = "a configuration named {name!r} already exists"
NO_SUCH_VERSION = "configuration {name!r} has no version {number}"
ROLLBACK_TO_CURRENT = "version {number} already has the current content; nothing to roll back"
LABELS_NOT_A_MAP = "labels must be an object of string keys and string values"
ROLLOUT_IN_PROGRESS = (
    "configuration {name!r} has an active rollout ({rollout_id}); finish or abort it before making another "
    "version current, or publish the version as a rollout candidate"
)
