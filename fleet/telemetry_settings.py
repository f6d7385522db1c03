"""Telemetry connection settings as documents (pure: no Django, no database).

An operator's entry (fleet.models.TelemetryConnectionSettings) holds, for the agents its
label selector matches, any of: a destination for each of the agent's own metrics, traces
and logs, named other connections, and a heartbeat interval. Each destination is a JSON
document checked and made canonical here (`check_destination`):

    {"destination_endpoint": "https://otlp.example:4318/v1/metrics",
     "headers": {"Authorization": "Bearer ..."},
     "tls": {"ca_pem": "-----BEGIN CERTIFICATE-----...", "insecure_skip_verify": false,
             "include_system_ca_certs_pool": true}}

(an other connection may add `other_settings`, a string map). A client certificate is
never offered: the agents' keys are theirs. Header values may be credentials: only operators
read them (`redacted`). Per agent, each field (own_metrics, own_traces,
own_logs, the heartbeat interval, and each other connection by name) comes from the
highest-priority matching entry that sets it (ties: the name) - `resolve`. What the agent
gets is a protobuf `ConnectionSettingsOffers` (`fill_offers`), whose hash is the SHA-256 of
its deterministic serialization with the hash left empty (`offers_hash`): the same settings
always give the same hash, whoever filled which part.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fleet.errors import InputProblems
from fleet.safe_text import text_problem
from opamp.capabilities import AgentCapabilities, has_capability
from opamp.proto import opamp_pb2

OWN_FIELDS = ("own_metrics", "own_traces", "own_logs")
# The capability an agent declares to be offered each own_* destination.
OWN_CAPABILITIES = {
    "own_metrics": AgentCapabilities.REPORTS_OWN_METRICS,
    "own_traces": AgentCapabilities.REPORTS_OWN_TRACES,
    "own_logs": AgentCapabilities.REPORTS_OWN_LOGS,
}
MAX_URL_CHARS = 2048
MAX_HEADERS = 32
MAX_HEADER_VALUE_CHARS = 4096
MAX_CA_PEM_CHARS = 64 * 1024
MAX_OTHER_CONNECTIONS = 32
MAX_OTHER_SETTINGS = 64
MAX_NAME_CHARS = 200
# The heartbeat interval an operator may set: at least a second, at most a day.
MIN_HEARTBEAT_SECONDS = 1
MAX_HEARTBEAT_SECONDS = 86_400

# RFC 9110 field names: a token.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")
_DESTINATION_KEYS = frozenset({"destination_endpoint", "headers", "tls"})
_OTHER_KEYS = _DESTINATION_KEYS | {"other_settings"}
_TLS_KEYS = frozenset({"ca_pem", "insecure_skip_verify", "include_system_ca_certs_pool"})


class SettingsProblems(InputProblems):
    """A settings document that fails its checks; every problem is listed."""


def _text(value: Any, where: str, problems: list[str], *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        problems.append(f"{where}: expected a string")
        return ""
    if problem := text_problem(value):
        problems.append(f"{where}: {problem}")
        return ""
    if len(value) > max_chars:
        problems.append(f"{where}: longer than {max_chars} characters")
    if not value and not allow_empty:
        problems.append(f"{where}: must not be empty")
    return value


def _url(value: Any, where: str, problems: list[str]) -> str:
    url = _text(value, where, problems, max_chars=MAX_URL_CHARS)
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as error:
        problems.append(f"{where}: not a URL ({error})")
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: must be an http:// or https:// URL with a host")
    elif any(char.isspace() or ord(char) < 0x20 for char in url):
        problems.append(f"{where}: must not contain whitespace or control characters")
    return url


def _headers(value: Any, where: str, problems: list[str]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected an object of header names to values")
        return {}
    if len(value) > MAX_HEADERS:
        problems.append(f"{where}: more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for name, header_value in value.items():
        if not isinstance(name, str) or text_problem(name) or not _HEADER_NAME.match(name):
            problems.append(f"{where}: {name!r} is not a valid header name")
            continue
        text = _text(header_value, f"{where}.{name}", problems, max_chars=MAX_HEADER_VALUE_CHARS, allow_empty=True)
        if any(char in "\r\n" or (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F for char in text):
            problems.append(f"{where}.{name}: control characters are not allowed in a header value")
            continue
        headers[name] = text
    return dict(sorted(headers.items()))


def _tls(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected an object")
        return {}
    for unknown in sorted(set(value) - _TLS_KEYS, key=str):
        problems.append(f"{where}.{unknown}: unknown field (client certificates are not offered)")
    tls: dict[str, Any] = {}
    if "ca_pem" in value:
        pem = _text(value["ca_pem"], f"{where}.ca_pem", problems, max_chars=MAX_CA_PEM_CHARS, allow_empty=True)
        if pem and not _PEM_CERTIFICATE.search(pem):
            problems.append(f"{where}.ca_pem: expected PEM certificates (-----BEGIN CERTIFICATE-----)")
        if pem:
            tls["ca_pem"] = pem
    for flag in ("insecure_skip_verify", "include_system_ca_certs_pool"):
        if flag in value:
            if not isinstance(value[flag], bool):
                problems.append(f"{where}.{flag}: expected true or false")
            elif value[flag]:
                tls[flag] = True
    return tls


def _destination(value: Any, where: str, problems: list[str], *, other: bool) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected an object")
        return {}
    allowed = _OTHER_KEYS if other else _DESTINATION_KEYS
    for unknown in sorted(set(value) - allowed, key=str):
        problems.append(f"{where}.{unknown}: unknown field")
    document: dict[str, Any] = {
        "destination_endpoint": _url(value.get("destination_endpoint"), f"{where}.destination_endpoint", problems)
    }
    if value.get("headers"):
        document["headers"] = _headers(value["headers"], f"{where}.headers", problems)
    if value.get("tls") and (tls := _tls(value["tls"], f"{where}.tls", problems)):
        document["tls"] = tls
    if other and value.get("other_settings"):
        raw = value["other_settings"]
        if not isinstance(raw, Mapping) or len(raw) > MAX_OTHER_SETTINGS:
            problems.append(f"{where}.other_settings: expected an object of at most {MAX_OTHER_SETTINGS} strings")
        else:
            document["other_settings"] = {
                _text(key, f"{where}.other_settings", problems, max_chars=MAX_NAME_CHARS): _text(
                    item, f"{where}.other_settings.{key}", problems, max_chars=MAX_HEADER_VALUE_CHARS, allow_empty=True
                )
                for key, item in sorted(raw.items(), key=lambda pair: str(pair[0]))
            }
    return document


def check_destination(value: Any, *, where: str, other: bool = False) -> dict[str, Any] | None:
    """The canonical document of one destination (None stays None); SettingsProblems otherwise."""
    if value is None:
        return None
    problems: list[str] = []
    document = _destination(value, where, problems, other=other)
    if problems:
        raise SettingsProblems(problems[0], field=where, problems=problems)
    return document


def check_other_connections(value: Any, *, where: str = "other_connections") -> dict[str, dict[str, Any]]:
    """The canonical map of named other connections."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsProblems(f"{where}: expected an object of names to settings", field=where)
    if len(value) > MAX_OTHER_CONNECTIONS:
        raise SettingsProblems(f"{where}: more than {MAX_OTHER_CONNECTIONS} connections", field=where)
    problems: list[str] = []
    connections: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        if _text(name, f"{where} name", problems, max_chars=MAX_NAME_CHARS):
            connections[name] = _destination(settings, f"{where}.{name}", problems, other=True)
    if problems:
        raise SettingsProblems(problems[0], field=where, problems=problems)
    return dict(sorted(connections.items()))


def check_heartbeat(value: Any, *, where: str = "heartbeat_interval_seconds") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsProblems(f"{where}: expected a whole number of seconds", field=where)
    if not MIN_HEARTBEAT_SECONDS <= value <= MAX_HEARTBEAT_SECONDS:
        raise SettingsProblems(
            f"{where}: must be between {MIN_HEARTBEAT_SECONDS} and {MAX_HEARTBEAT_SECONDS} seconds", field=where
        )
    return value


@dataclass(frozen=True)
class SettingsEntry:
    """One operator entry as the resolver sees it (fleet.models.TelemetryConnectionSettings)."""

    name: str
    priority: int
    matches: Any  # Callable[[Mapping[str, str]], bool]: the entry's selector
    own: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)
    other_connections: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    heartbeat_interval_seconds: int | None = None


@dataclass(frozen=True)
class ResolvedSettings:
    """What one agent should have, field by field (None / empty: not set by any entry)."""

    own: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    other_connections: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    heartbeat_interval_seconds: int | None = None

    def is_empty(self) -> bool:
        return not self.own and not self.other_connections and self.heartbeat_interval_seconds is None

    def for_capabilities(self, capabilities: int) -> ResolvedSettings:
        """Only what the agent declared it accepts."""
        own = {name: doc for name, doc in self.own.items() if has_capability(capabilities, OWN_CAPABILITIES[name])}
        other = (
            self.other_connections
            if has_capability(capabilities, AgentCapabilities.ACCEPTS_OTHER_CONNECTION_SETTINGS)
            else {}
        )
        heartbeat = (
            self.heartbeat_interval_seconds
            if has_capability(capabilities, AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS)
            else None
        )
        return ResolvedSettings(own=own, other_connections=other, heartbeat_interval_seconds=heartbeat)


def resolve(entries: Iterable[SettingsEntry], labels: Mapping[str, str]) -> ResolvedSettings:
    """Per field, the highest-priority matching entry that sets it (ties: the smaller name)."""
    own: dict[str, dict[str, Any]] = {}
    other: dict[str, dict[str, Any]] = {}
    heartbeat: int | None = None
    for entry in sorted(entries, key=lambda entry: (-entry.priority, entry.name)):
        if not entry.matches(labels):
            continue
        for name in OWN_FIELDS:
            document = entry.own.get(name)
            if document is not None and name not in own:
                own[name] = document
        for name, document in entry.other_connections.items():
            other.setdefault(name, document)
        if heartbeat is None:
            heartbeat = entry.heartbeat_interval_seconds
    return ResolvedSettings(
        own=own, other_connections=dict(sorted(other.items())), heartbeat_interval_seconds=heartbeat
    )


HIDDEN = "(hidden)"


def redacted(document: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A destination as a reader without the operator role sees it: header values (bearer
    tokens, API keys) hidden, their names kept."""
    if document is None:
        return None
    shown = dict(document)
    if "headers" in shown:
        shown["headers"] = dict.fromkeys(shown["headers"], HIDDEN)
    return shown


def _fill_destination(target: Any, document: Mapping[str, Any]) -> None:
    target.destination_endpoint = document["destination_endpoint"]
    for name, value in document.get("headers", {}).items():
        target.headers.headers.add(key=name, value=value)
    tls = document.get("tls")
    if tls:
        target.tls.ca_pem_contents = tls.get("ca_pem", "")
        target.tls.insecure_skip_verify = bool(tls.get("insecure_skip_verify"))
        target.tls.include_system_ca_certs_pool = bool(tls.get("include_system_ca_certs_pool"))
    for key, value in document.get("other_settings", {}).items():
        target.other_settings[key] = value


def fill_offers(offers: opamp_pb2.ConnectionSettingsOffers, settings: ResolvedSettings, *, endpoint: str) -> None:
    """Add the settings to `offers` (the hash is left to `seal`). A heartbeat interval goes
    in `opamp` with the endpoint the agent used: the protocol wants both in every OpAMP
    settings offer."""
    for name, document in settings.own.items():
        _fill_destination(getattr(offers, name), document)
    for name, document in settings.other_connections.items():
        _fill_destination(offers.other_connections[name], document)
    if settings.heartbeat_interval_seconds is not None:
        if not offers.opamp.destination_endpoint:
            offers.opamp.destination_endpoint = endpoint
        offers.opamp.heartbeat_interval_seconds = settings.heartbeat_interval_seconds


def offers_hash(offers: opamp_pb2.ConnectionSettingsOffers) -> bytes:
    """SHA-256 over the offers' deterministic serialization, the hash field left empty."""
    unhashed = opamp_pb2.ConnectionSettingsOffers()
    unhashed.CopyFrom(offers)
    unhashed.ClearField("hash")
    return hashlib.sha256(unhashed.SerializeToString(deterministic=True)).digest()


def seal(offers: opamp_pb2.ConnectionSettingsOffers) -> bytes:
    """Set the offers' hash over everything they hold; return it."""
    digest = offers_hash(offers)
    offers.hash = digest
    return digest


def settings_digest(settings: ResolvedSettings, *, endpoint: str) -> bytes:
    """The hash the settings have as an offer of their own."""
    offers = opamp_pb2.ConnectionSettingsOffers()
    fill_offers(offers, settings, endpoint=endpoint)
    return offers_hash(offers)
