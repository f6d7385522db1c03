"""The agent's version, reported as `service.version` and in the User-Agent header."""

from __future__ import annotations

__version__ = "1.0.0"
USER_AGENT = f"opamp-agent-client/{__version__}"
