"""One agent's page: its health tree, desired against effective config, certificates, audit,
and the operator's actions (labels, re-send, restart, revoke a certificate).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet import agent_labels
from fleet import selectors as fleet_selectors
from fleet.commands import command_list, restart_request
from fleet.errors import DomainError
from fleet.models import Agent
from opamp.capabilities import AgentCapabilities, has_capability
from rollouts import resend, selectors
from rollouts.dashboard.views.shared import files_of, number_or, page, page_context, side_by_side
from signing import certificates as signing_certificates
from signing.models import IssuedCertificate

NOT_RESTARTABLE = "this agent does not accept restart commands"
RESTART_TOO_SOON = "a restart of this agent is pending or was requested within OPAMP_RESTART_MIN_INTERVAL_SECONDS"


def _health_tree(health: Any, name: str = "agent") -> dict[str, Any]:
    """The reported ComponentHealth document as nested nodes for the tree template."""
    if not isinstance(health, dict):
        return {"name": name, "healthy": None, "status": "", "error": "", "children": []}
    children = health.get("components") or {}
    return {
        "name": name,
        "healthy": health.get("healthy"),
        "status": health.get("status", ""),
        "error": health.get("last_error", ""),
        "children": [_health_tree(child, key) for key, child in sorted(children.items()) if isinstance(child, dict)],
    }


@page
def agent_detail(request: HttpRequest, instance_uid: uuid.UUID) -> HttpResponse:
    agent = get_object_or_404(fleet_selectors.agent_list(), instance_uid=instance_uid)
    errors: list[str] = []
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "labels":
                labels = {}
                for line in request.POST.get("labels", "").splitlines():
                    if line.strip():
                        key, sep, value = line.partition("=")
                        if not sep:
                            raise DomainError(f"{line.strip()!r}: write each label as key=value")
                        labels[key.strip()] = value.strip()
                agent_labels.agent_labels_set(instance_uid=agent.instance_uid, labels=labels, actor=request.user)
            elif action == "resend":
                resend.agent_config_resend(agent=agent, actor=request.user)
            elif action == "restart":
                outcome = restart_request(agents=Agent.objects.filter(pk=agent.pk), actor=request.user)
                if outcome.not_capable:
                    errors.append(NOT_RESTARTABLE)
                elif outcome.rate_limited:
                    errors.append(RESTART_TOO_SOON)
            elif action == "revoke":
                certificate = get_object_or_404(
                    IssuedCertificate, pk=number_or(request.POST.get("certificate"), 0), instance_uid=agent.instance_uid
                )
                signing_certificates.certificate_revoke(certificate=certificate, actor=request.user)
            if not errors:
                return redirect("dashboard-agent", instance_uid=agent.instance_uid)
        except DomainError as error:
            errors.append(error.message)
    state = selectors.agent_config_state(agent)
    desired = getattr(agent, "desired_config", None) if hasattr(agent, "desired_config") else None
    desired_files = files_of(desired.version.files) if desired is not None else {}
    effective_files = files_of(agent.effective_config)
    certificates = IssuedCertificate.objects.filter(instance_uid=agent.instance_uid).order_by("-not_before")
    return render(
        request,
        "dashboard/agent.html",
        page_context(
            request,
            agent=agent,
            errors=errors,
            state=state,
            desired=desired,
            health=_health_tree(agent.health),
            diff=side_by_side(effective_files, desired_files),
            operator_labels="\n".join(f"{k}={v}" for k, v in sorted(agent.operator_labels.items())),
            certificates=certificates,
            restartable=has_capability(agent.capabilities, AgentCapabilities.ACCEPTS_RESTART_COMMAND),
            commands=command_list().filter(agent=agent)[:5],
            # Changes made to the agent, and to its certificates (those name its uid).
            audit=fleet_selectors.audit_list().filter(
                Q(target_type=Agent.__name__, target_id=str(agent.pk))
                | Q(details__instance_uid=str(agent.instance_uid))
            )[:20],
        ),
    )
