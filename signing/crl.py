"""The certificate revocation list: signed by the configured CA, written to OPAMP_CRL_FILE.

The TLS terminator reads the file; it is rewritten after every revocation and re-signed
periodically, each time replaced atomically so a reader never sees half of it.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509 import ReasonFlags
from django.conf import settings
from django.utils import timezone

from signing import ca as ca_module
from signing.ca import RevokedEntry
from signing.configured_ca import certificate_authority_required
from signing.models import REVOKED_UNSPECIFIED, CertificateAuthority, IssuedCertificate


def crl_publish() -> Path | None:
    """Write a fresh CRL to OPAMP_CRL_FILE; None when no file is configured.

    Run after every revocation and periodically (a CRL past its nextUpdate makes the TLS
    terminator refuse every client certificate, so it must be re-signed well before).
    """
    if not settings.OPAMP_CRL_FILE:
        return None
    return crl_write(settings.OPAMP_CRL_FILE)


def crl_refresh_if_due(*, now: datetime | None = None) -> Path | None:
    """Re-sign OPAMP_CRL_FILE once half of its nextUpdate window has passed.

    Checked hourly by beat. Re-signing only when due (and after each revocation) keeps
    TLS-terminator reloads, which the file change triggers, to a few a day. A file that is
    missing, unreadable or not signed by the configured CA is written at once.
    """
    if not settings.OPAMP_CRL_FILE:
        return None
    loaded = certificate_authority_required()
    moment = now or timezone.now()
    try:
        current = x509.load_pem_x509_crl(Path(settings.OPAMP_CRL_FILE).read_bytes())
        trusted = current.is_signature_valid(loaded.cert.public_key())  # type: ignore[arg-type]
        next_update = current.next_update_utc
    except (OSError, ValueError, TypeError):
        trusted, next_update = False, None
    window = timedelta(hours=settings.OPAMP_CRL_NEXT_UPDATE_HOURS)
    if trusted and next_update is not None and next_update - moment > window / 2:
        return None
    return crl_write(settings.OPAMP_CRL_FILE)


def crl_write(path: str | Path) -> Path:
    """Sign a fresh CRL and replace `path` with it atomically (a reader never sees half)."""
    target = Path(path)
    write_public_file_atomically(target, crl_pem())
    return target


def write_public_file_atomically(target: Path, data: bytes) -> None:
    """Replace `target` (mode 0644) by a rename, so a reader (nginx, a reload) never sees half."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def crl_pem(*, now: datetime | None = None) -> bytes:
    """A freshly signed CRL of the configured CA (PEM)."""
    loaded = certificate_authority_required()
    moment = now or timezone.now()
    authority = CertificateAuthority.objects.filter(fingerprint_sha256=loaded.fingerprint_sha256).first()
    entries: list[RevokedEntry] = []
    if authority is not None:
        # Expired certificates are refused on their dates alone; leaving them out keeps
        # the CRL short for the TLS terminator that reloads it.
        revoked = IssuedCertificate.objects.filter(
            authority=authority, revoked_at__isnull=False, not_after__gt=moment
        ).values_list("serial_hex", "revoked_at", "revocation_reason")
        entries = [
            RevokedEntry(serial=int(serial, 16), revoked_at=revoked_at, reason=_reason_flag(reason))
            for serial, revoked_at, reason in revoked
        ]
    return ca_module.build_crl(
        entries,
        ca_key=loaded.key,
        ca_cert=loaded.cert,
        next_update_hours=settings.OPAMP_CRL_NEXT_UPDATE_HOURS,
        now=moment,
    )


def _reason_flag(reason: str) -> ReasonFlags | None:
    if not reason or reason == REVOKED_UNSPECIFIED:
        return None
    return ReasonFlags[reason]
