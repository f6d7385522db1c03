"""Operator pages (server-rendered): the fleet overview."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from fleet import selectors

RECENT_AGENTS = 50


@staff_member_required
def fleet_overview(request: HttpRequest) -> HttpResponse:
    """Counts by status and transport, and the most recently seen agents."""
    agents = selectors.agent_list()
    by_status = selectors.counts_by(agents, "status")
    by_transport = selectors.counts_by(agents, "transport")
    context = {
        "total": sum(by_status.values()),
        "by_status": [(status, by_status.get(status, 0)) for status, _ in selectors.AgentStatus.CHOICES],
        "by_transport": sorted(by_transport.items()),
        "recent": agents.order_by("-last_seen")[:RECENT_AGENTS],
    }
    return render(request, "fleet/overview.html", context)
