"""Config files as operators publish them: validation and canonical hashing. Pure Python.

A config map is {file name: ConfigFileSpec}. Bodies are text (what operators write); they
travel to agents as UTF-8 bytes, byte for byte. Validation happens before anything is
stored, and every error names the file it is about.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from fleet.errors import InputProblems
from opamp.hashing import config_map_hash

YAML_TYPES = frozenset({"text/yaml", "application/yaml", "application/x-yaml", "text/x-yaml"})
JSON_TYPES = frozenset({"application/json", "text/json"})
TEXT_TYPES = frozenset({"text/plain"})
KNOWN_CONTENT_TYPES = YAML_TYPES | JSON_TYPES | TEXT_TYPES
MAX_FILE_NAME_CHARS = 255


CONFIG_FILES_INVALID = "the configuration files are invalid"


class ConfigValidationError(InputProblems):
    """One or more problems with a config map; `problems` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(CONFIG_FILES_INVALID, field="files", problems=problems)

    def __str__(self) -> str:
        return "; ".join(self.problems)


@dataclass(frozen=True)
class ConfigFileSpec:
    body: bytes
    content_type: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass(frozen=True)
class ConfigLimits:
    max_file_bytes: int = 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024
    max_files: int = 64


def _problems_of_file(name: str, spec: Any, limits: ConfigLimits) -> list[str]:
    where = f"file {name!r}"
    if not isinstance(spec, Mapping):
        return [f"{where}: expected an object with 'body' and 'content_type'"]
    unknown = set(spec) - {"body", "content_type"}
    if unknown:
        return [f"{where}: unknown field(s) {', '.join(sorted(unknown))}"]
    body, content_type = spec.get("body"), spec.get("content_type", "")
    if not isinstance(body, str):
        return [f"{where}: 'body' must be a string"]
    if not isinstance(content_type, str):
        return [f"{where}: 'content_type' must be a string"]
    content_type = content_type.split(";")[0].strip().lower()
    if content_type not in KNOWN_CONTENT_TYPES:
        return [f"{where}: content type {content_type!r} is not one of {', '.join(sorted(KNOWN_CONTENT_TYPES))}"]
    size = len(body.encode("utf-8"))
    if size > limits.max_file_bytes:
        return [f"{where}: {size} bytes is over the per-file limit of {limits.max_file_bytes}"]
    try:
        if content_type in YAML_TYPES:
            yaml.safe_load(body)
        elif content_type in JSON_TYPES:
            json.loads(body)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        kind = "YAML" if content_type in YAML_TYPES else "JSON"
        detail = " ".join(str(error).split())
        return [f"{where}: invalid {kind}: {detail}"]
    return []


def parse_config_files(data: Any, *, limits: ConfigLimits | None = None) -> dict[str, ConfigFileSpec]:
    """Validate `{name: {"body": str, "content_type": str}}`; raise ConfigValidationError."""
    limits = limits or ConfigLimits()
    if not isinstance(data, Mapping):
        raise ConfigValidationError(["files must be an object mapping file names to files"])
    problems: list[str] = []
    if len(data) > limits.max_files:
        problems.append(f"{len(data)} files is over the limit of {limits.max_files}")
    total = 0
    files: dict[str, ConfigFileSpec] = {}
    for name, spec in data.items():
        if not isinstance(name, str) or len(name) > MAX_FILE_NAME_CHARS:
            problems.append(
                f"file name {str(name)[:40]!r}... must be a string of at most {MAX_FILE_NAME_CHARS} characters"
            )
            continue
        if any(ord(ch) < 32 for ch in name):
            problems.append(f"file name {name!r} contains control characters")
            continue
        file_problems = _problems_of_file(name, spec, limits)
        if file_problems:
            problems.extend(file_problems)
            continue
        body = spec["body"].encode("utf-8")
        total += len(body)
        files[name] = ConfigFileSpec(body=body, content_type=spec.get("content_type", "").split(";")[0].strip().lower())
    if total > limits.max_total_bytes:
        problems.append(f"{total} bytes in all is over the total limit of {limits.max_total_bytes}")
    if problems:
        raise ConfigValidationError(problems)
    return files


def files_to_document(files: Mapping[str, ConfigFileSpec]) -> dict[str, dict[str, str]]:
    """The stored JSON form, sorted by name."""
    return {name: {"body": files[name].text, "content_type": files[name].content_type} for name in sorted(files)}


def files_hash(files: Mapping[str, ConfigFileSpec]) -> str:
    """Hex SHA-256 over the canonical encoding (opamp.hashing), as sent in config_hash."""
    return config_map_hash(files).hex()
