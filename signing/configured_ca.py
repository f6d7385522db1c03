"""The certificate authority this server issues agent certificates with.

Loaded from the files OPAMP_CA_KEY_FILE and OPAMP_CA_CERT_FILE name (read before any
transaction starts: no file I/O happens while a row is locked); its certificate, never its
key, is recorded in the database. The X.509 work itself is `signing.ca`.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from fleet.audit import Actor, audit_record
from signing import ca as ca_module
from signing.ca import CaInvalid, LoadedCa
from signing.errors import CA_NOT_CONFIGURED, CA_UNUSABLE, SigningError
from signing.file_cache import loaded_files
from signing.models import CertificateAuthority


def certificate_authority_load() -> LoadedCa | None:
    """The CA from OPAMP_CA_KEY_FILE / OPAMP_CA_CERT_FILE, None when not configured."""
    key_file, cert_file = settings.OPAMP_CA_KEY_FILE, settings.OPAMP_CA_CERT_FILE
    if not key_file or not cert_file:
        return None
    try:
        loaded: LoadedCa = loaded_files.get(
            (str(key_file), str(cert_file)), lambda: ca_module.load_ca(key_file=key_file, cert_file=cert_file)
        )
    except OSError as error:
        raise SigningError(CA_UNUSABLE.format(problem=type(error).__name__), status=503) from None
    except CaInvalid as error:
        raise SigningError(CA_UNUSABLE.format(problem=error), status=503) from None
    return loaded


def certificate_authority_required() -> LoadedCa:
    """The configured CA; refused (503) when there is none."""
    loaded = certificate_authority_load()
    if loaded is None:
        raise SigningError(CA_NOT_CONFIGURED, status=503)
    return loaded


def ca_certificate_pem() -> str | None:
    """The configured CA certificate (PEM), to hand agents as `ca_cert`; None when not configured."""
    loaded = certificate_authority_load()
    return loaded.cert_pem if loaded is not None else None


def certificate_authority_register(*, ca: LoadedCa, actor: Actor) -> CertificateAuthority:
    """Record the CA's certificate (never its key); idempotent by fingerprint."""
    with transaction.atomic():
        authority, created = CertificateAuthority.objects.get_or_create(
            fingerprint_sha256=ca.fingerprint_sha256,
            defaults={
                "subject": ca.cert.subject.rfc4514_string()[:500],
                "certificate_pem": ca.cert_pem,
                "not_before": ca.cert.not_valid_before_utc,
                "not_after": ca.cert.not_valid_after_utc,
            },
        )
        if created:
            audit_record(
                actor=actor,
                action="certificate_authority.register",
                target=authority,
                details={"subject": authority.subject, "fingerprint_sha256": authority.fingerprint_sha256},
            )
    return authority
