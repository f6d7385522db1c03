"""Thin Celery tasks for the signing app; each calls one service and is safe to run twice."""

from __future__ import annotations

from celery import shared_task

from signing import services


@shared_task(acks_late=True, ignore_result=True)
def refresh_crl() -> str:
    """Re-sign the CRL file long before its nextUpdate, revocations or not."""
    if not services.ca_certificate_pem():
        return "no certificate authority configured"
    written = services.crl_publish()
    return f"wrote {written}" if written else "no CRL file configured"
