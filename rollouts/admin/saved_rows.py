"""What the rollouts admins share when a service did the saving."""

from __future__ import annotations

from django.db.models import Model


def become(obj: Model, saved: Model) -> None:
    """Make the admin's unsaved instance the row the service saved, so the admin's own
    follow-up (log entry, redirect to the change page) refers to that row."""
    obj.__dict__.update(saved.__dict__)
