"""The errors every app raises for a refused request; the API maps them to one body shape
(`fleet.api.exceptions`). Pure Python: the protocol-free parsers (label selectors, config
files) raise them too."""

from __future__ import annotations

from collections.abc import Sequence


class DomainError(Exception):
    """A request that cannot be carried out as asked; mapped to HTTP 400 by the API."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


class InputProblems(ValueError):
    """Input that fails validation: a summary, the field it concerns and every problem found
    (answered with 400 and all of them, so a user fixes everything in one go)."""

    def __init__(self, detail: str, *, field: str | None, problems: Sequence[str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.problems = list(problems) if problems is not None else [detail]
