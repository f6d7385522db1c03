"""Thin Celery tasks for the signing app; each calls one service and is safe to run twice."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from signing.configured_ca import ca_certificate_pem
from signing.crl import crl_refresh_if_due


@shared_task(acks_late=True, ignore_result=True)
def refresh_crl() -> str:
    """Re-sign the CRL file long before its nextUpdate, revocations or not."""
    if not ca_certificate_pem():
        return "no certificate authority configured"
    if not settings.OPAMP_CRL_FILE:
        return "no CRL file configured"
    written = crl_refresh_if_due()
    return f"wrote {written}" if written else "the CRL file is current"
