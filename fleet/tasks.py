"""Thin Celery tasks for the fleet; each calls one service and is safe to run twice."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from fleet import selectors, services


@shared_task(acks_late=True, ignore_result=True)
def sweep_stale_connections() -> int:
    """Mark agents disconnected whose server process vanished without closing their session."""
    now = timezone.now()
    return services.agents_mark_stale_disconnected(seen_before=now - selectors.offline_after(), at=now)
