"""Setting an agent's operator labels: checked, audited, and announced to the extensions
(the labels decide what the feature apps assign to the agent)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from django.db import transaction

from fleet import extensions
from fleet.audit import Actor, audit_record
from fleet.errors import DomainError
from fleet.label_selectors.selector import SelectorError, check_label
from fleet.labels import merged_labels
from fleet.models import Agent

LABELS_NOT_A_MAP = "labels must be an object of string keys and string values"


def check_labels(labels: Any) -> dict[str, str]:
    """Operator labels, each one a selector can select; DomainError names the first bad one."""
    if not isinstance(labels, Mapping):
        raise DomainError(LABELS_NOT_A_MAP, field="labels")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        try:
            key, value = check_label(key, value)
        except SelectorError as error:
            raise DomainError(str(error), field="labels") from None
        checked[key] = value
    return checked


def _labels_after(agent: Agent, operator: Mapping[str, str], *, replace: bool) -> dict[str, str]:
    return merged_labels(
        identifying=agent.identifying_attributes,
        non_identifying=agent.non_identifying_attributes,
        operator=operator if replace else {**agent.operator_labels, **operator},
    )


@transaction.atomic
def agent_labels_set(*, instance_uid: uuid.UUID, labels: Any, actor: Actor, replace: bool = True) -> Agent:
    """Set (or, with replace=False, merge) the operator labels of an agent; the extensions
    are told (rollouts re-resolves its desired state)."""
    checked = check_labels(labels)
    unlocked = Agent.objects.filter(instance_uid=instance_uid).first()
    if unlocked is not None:
        # Extensions may lock their own rows (a configuration, say) first, as they do
        # everywhere else, so the agent's row is locked after them.
        extensions.labels_changing(agent=unlocked, new_labels=_labels_after(unlocked, checked, replace=replace))
    agent = Agent.objects.select_for_update().get(instance_uid=instance_uid)
    before = dict(agent.operator_labels)
    agent.operator_labels = checked if replace else {**agent.operator_labels, **checked}
    agent.labels = _labels_after(agent, checked, replace=True)
    agent.save(update_fields=["operator_labels", "labels", "updated_at"])
    audit_record(
        actor=actor,
        action="agent.labels.set",
        target=agent,
        details={"instance_uid": str(instance_uid), "before": before, "after": agent.operator_labels},
    )
    extensions.labels_changed(agent=agent)
    return agent
