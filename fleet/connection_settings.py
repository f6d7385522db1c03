"""Telemetry connection settings: operators' entries written (audited), read, and resolved
per agent.

An entry (`TelemetryConnectionSettings`) picks agents by label selector and sets any of
own_metrics, own_traces, own_logs, named other connections and a heartbeat interval;
fleet.telemetry_settings checks the documents and resolves each field by priority. Every
write, and every operator's label change that changes what an agent's entries resolve to,
replaces the `TelemetrySettingsRevision` token in its transaction: each server process
reads the token at most once a second (fleet.connection_settings_contributor) and resolves
its agents again when it moved, so a connected agent gets a changed offer on its next
message at the latest; the connected agents concerned are also hinted (`settings`) after
commit, so a live WebSocket gets it pushed at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent, TelemetryConnectionSettings, TelemetrySettingsRevision
from fleet.notify import notify_connection_settings_changed
from fleet.selector_queries import selector_q
from fleet.telemetry_settings import (
    OWN_FIELDS,
    ResolvedSettings,
    SettingsEntry,
    check_destination,
    check_heartbeat,
    check_other_connections,
    resolve,
)

NAME_TAKEN = "telemetry connection settings named {name!r} already exist"
REVISION_ID = 1
# The fields of an entry a write may set, besides the name.
SETTINGS_FIELDS = (
    "description",
    "selector",
    "priority",
    *OWN_FIELDS,
    "other_connections",
    "heartbeat_interval_seconds",
)


def bump_revision() -> None:
    """What the entries resolve to may have changed: a new token (in the caller's transaction)."""
    updated = TelemetrySettingsRevision.objects.filter(pk=REVISION_ID).update(
        token=secrets.token_hex(16), changed_at=timezone.now()
    )
    if not updated:
        TelemetrySettingsRevision.objects.update_or_create(
            pk=REVISION_ID, defaults={"token": secrets.token_hex(16), "changed_at": timezone.now()}
        )


def revision_token() -> str:
    return TelemetrySettingsRevision.objects.filter(pk=REVISION_ID).values_list("token", flat=True).first() or ""


def labels_changing(*, agent: Agent, new_labels: Mapping[str, str]) -> None:
    """An operator is changing an agent's labels: when that changes what its settings
    resolve to, every process resolves again and the agent is hinted after commit. (A report
    that changes the labels is seen by the process it reaches: FleetRuntime.agent_changed.)"""
    entries = settings_entries()
    if not entries or resolve(entries, agent.labels or {}) == resolve(entries, new_labels):
        return
    bump_revision()
    if agent.connected:
        uid = agent.instance_uid
        transaction.on_commit(lambda: notify_connection_settings_changed([uid]))


def _hint_selected(*selectors: Any) -> None:
    """After commit, a hint to the connected agents either selector picks (the old and the
    new): their live sessions look again and push what changed."""
    query = Q()
    for selector in selectors:
        query |= selector_q(parse_selector(selector or {}))
    uids = list(Agent.objects.filter(query, connected=True).values_list("instance_uid", flat=True))
    if uids:
        transaction.on_commit(lambda: notify_connection_settings_changed(uids))


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    """The given fields checked and in their stored form."""
    checked = dict(values)
    if "selector" in values:
        checked["selector"] = parse_selector(values["selector"] or {}).to_dict()
    for name in OWN_FIELDS:
        if name in values:
            checked[name] = check_destination(values[name], where=name)
    if "other_connections" in values:
        checked["other_connections"] = check_other_connections(values["other_connections"])
    if "heartbeat_interval_seconds" in values:
        checked["heartbeat_interval_seconds"] = check_heartbeat(values["heartbeat_interval_seconds"])
    return checked


def _details(entry: TelemetryConnectionSettings) -> dict[str, Any]:
    """What the audit row keeps: the shape, never header values (they may hold secrets)."""
    return {
        "name": entry.name,
        "selector": entry.selector,
        "priority": entry.priority,
        "fields": [name for name in OWN_FIELDS if getattr(entry, name) is not None]
        + (["other_connections"] if entry.other_connections else [])
        + (["heartbeat_interval_seconds"] if entry.heartbeat_interval_seconds is not None else []),
    }


@transaction.atomic
def telemetry_settings_create(*, name: str, actor: Actor, **values: Any) -> TelemetryConnectionSettings:
    unknown = set(values) - set(SETTINGS_FIELDS)
    if unknown:
        raise TypeError(f"unknown fields {sorted(unknown)}")
    if TelemetryConnectionSettings.objects.filter(name=name).exists():
        raise DomainError(NAME_TAKEN.format(name=name), field="name")
    entry = TelemetryConnectionSettings(name=name, created_by=actor_user(actor), **_checked(values))
    entry.full_clean()
    entry.save()
    bump_revision()
    _hint_selected(entry.selector)
    audit_record(actor=actor, action="telemetry_settings.create", target=entry, details=_details(entry))
    return entry


@transaction.atomic
def telemetry_settings_update(
    *, entry: TelemetryConnectionSettings, actor: Actor, **values: Any
) -> TelemetryConnectionSettings:
    """Change the given fields (a field given as null is cleared)."""
    unknown = set(values) - {"name", *SETTINGS_FIELDS}
    if unknown:
        raise TypeError(f"unknown fields {sorted(unknown)}")
    entry = TelemetryConnectionSettings.objects.select_for_update().get(pk=entry.pk)
    previous_selector = entry.selector
    name = values.pop("name", None)
    if name is not None and name != entry.name:
        if TelemetryConnectionSettings.objects.filter(name=name).exclude(pk=entry.pk).exists():
            raise DomainError(NAME_TAKEN.format(name=name), field="name")
        entry.name = name
    for key, value in _checked(values).items():
        setattr(entry, key, value)
    entry.full_clean()
    entry.save()
    bump_revision()
    _hint_selected(previous_selector, entry.selector)
    audit_record(actor=actor, action="telemetry_settings.update", target=entry, details=_details(entry))
    return entry


@transaction.atomic
def telemetry_settings_delete(*, entry: TelemetryConnectionSettings, actor: Actor) -> None:
    audit_record(actor=actor, action="telemetry_settings.delete", target=entry, details=_details(entry))
    _hint_selected(entry.selector)
    entry.delete()
    bump_revision()


def telemetry_settings_list() -> QuerySet[TelemetryConnectionSettings]:
    return TelemetryConnectionSettings.objects.order_by("-priority", "name")


def settings_entries() -> list[SettingsEntry]:
    """Every entry as the resolver sees it (a small table, read whole)."""
    return [
        SettingsEntry(
            name=entry.name,
            priority=entry.priority,
            matches=parse_selector(entry.selector or {}).matches,
            own={name: getattr(entry, name) for name in OWN_FIELDS},
            other_connections=entry.other_connections or {},
            heartbeat_interval_seconds=entry.heartbeat_interval_seconds,
        )
        for entry in telemetry_settings_list()
    ]


def agent_labels(agent_id: int) -> dict[str, str]:
    labels = Agent.objects.filter(pk=agent_id).values_list("labels", flat=True).first()
    return dict(labels or {})


def settings_for_agent(agent: Agent) -> ResolvedSettings:
    """What `agent` should have, before its capabilities are considered (the API shows it)."""
    return resolve(settings_entries(), agent.labels or {})
