"""Checks a remote config must pass before any of its files is written.

Every check runs before the first write, so a rejected config leaves the files of the
previous one untouched. The fault-injection rules (`fail_if_contains`, `fail_apply`) exist
for rollout drills: they make chosen agents fail the way a real agent rejects a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The protocol reserves the empty name for "the agent's single config file"; on disk it
# needs a real name.
EMPTY_NAME_FILE = "agent.conf"
MAX_FILE_NAME_BYTES = 255

MARKER_REJECTED = "config rejected: contains marker {marker}"
FAIL_APPLY_REJECTED = "config rejected: the agent is set to fail every apply"
INVALID_FILE_NAME = "invalid config file name {name!r}: {reason}"
FILE_NAME_COLLISION = "config file names {first!r} and {second!r} map to the same file"


class ConfigRejected(Exception):
    """A remote config the agent refuses; the message is reported as `error_message`."""


@dataclass(frozen=True)
class ConfigFile:
    """One file of a config map, as received and as reported back in the effective config."""

    body: bytes
    content_type: str = ""


def disk_name(name: str) -> str:
    """The file name under `<state-dir>/config/` for config map entry `name`.

    Names come from the server, so they are treated as hostile: anything that could
    leave the config directory or hide among the agent's own temporary files is refused.
    """
    if name == "":
        return EMPTY_NAME_FILE
    reason = None
    if "/" in name or "\\" in name:
        reason = "path separators are not allowed"
    elif ".." in name:
        reason = "'..' is not allowed"
    elif name.startswith("."):
        reason = "names starting with '.' are reserved for the agent's temporary files"
    elif any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        reason = "control characters are not allowed"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
        reason = f"longer than {MAX_FILE_NAME_BYTES} bytes"
    if reason is not None:
        raise ConfigRejected(INVALID_FILE_NAME.format(name=name, reason=reason))
    return name


def check_remote_config(files: Mapping[str, ConfigFile], *, fail_if_contains: bytes | None, fail_apply: bool) -> None:
    """Raise ConfigRejected when `files` must not be applied. An empty map is valid."""
    seen: dict[str, str] = {}
    for name in sorted(files):
        target = disk_name(name)
        if target in seen:
            raise ConfigRejected(FILE_NAME_COLLISION.format(first=seen[target], second=name))
        seen[target] = name
    if fail_if_contains:
        for file in files.values():
            if fail_if_contains in file.body:
                marker = fail_if_contains.decode("utf-8", "replace")
                raise ConfigRejected(MARKER_REJECTED.format(marker=marker))
    if fail_apply:
        raise ConfigRejected(FAIL_APPLY_REJECTED)
