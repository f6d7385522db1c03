"""Config-signing keys: the configured key pair, and the public halves recorded as accepted.

The private key lives in the file OPAMP_SIGNING_KEY_FILE names; the database holds only
public halves. Every change is one row-locked or conditional update in a transaction and
writes one audit row, so a repeated call changes nothing the second time.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fleet.audit import Actor, audit_record
from opamp.config_signature import SigningKeyError, key_id_for, load_public_key_pem
from signing import config_signing
from signing.config_signing import KEY_FILE_UNREADABLE, SigningKeyPair
from signing.errors import SIGNING_KEY_IN_USE, SIGNING_KEY_RETIRED, SigningError
from signing.file_cache import loaded_files
from signing.models import SigningKey


def active_signing_key_pair() -> SigningKeyPair | None:
    """The key in OPAMP_SIGNING_KEY_FILE, or None when signing is not configured."""
    path = settings.OPAMP_SIGNING_KEY_FILE
    if not path:
        return None
    try:
        pair: SigningKeyPair = loaded_files.get((str(path),), lambda: SigningKeyPair.from_file(path))
    except OSError as error:
        raise SigningError(KEY_FILE_UNREADABLE.format(path=path, problem=type(error).__name__), status=503) from None
    except SigningKeyError as error:
        raise SigningError(str(error), status=503) from None
    return pair


def signing_key_pair_for_new_signature() -> SigningKeyPair | None:
    """The configured key pair, cleared to sign; None when no signing key is configured.

    A retired key refuses to sign. A key file used for the first time has its public half
    recorded as the active key, so the accepted-key list matches what signs.
    """
    pair = active_signing_key_pair()
    if pair is None:
        return None
    row = SigningKey.objects.filter(key_id=pair.key_id).values_list("active", "retired_at").first()
    if row is not None and row[1] is not None:
        raise SigningError(SIGNING_KEY_RETIRED.format(key_id=pair.key_id))
    if row is None or not row[0]:
        # First signature with a newly configured key file: publish its public half so the
        # accepted-key list matches what signs (rare: once per key change).
        signing_key_register_active(actor=None)
    return pair


@transaction.atomic
def signing_key_register(*, public_key_pem: str, actor: Actor, active: bool = False) -> SigningKey:
    """Record a public key as accepted (and, with `active`, as the one that signs).

    Only public material is accepted: anything that does not parse as an Ed25519 public key
    is refused, so a private key pasted here by mistake never reaches the database.
    """
    try:
        public_key = load_public_key_pem(public_key_pem)
    except SigningKeyError as error:
        raise SigningError(str(error), field="public_key_pem") from None
    key_id = key_id_for(public_key)
    # Store the key re-serialised, never the text given: a paste could carry more PEM
    # blocks after the public key (a private key among them).
    key, created = SigningKey.objects.get_or_create(
        key_id=key_id, defaults={"public_key_pem": config_signing.public_key_pem(public_key), "active": False}
    )
    key = SigningKey.objects.select_for_update().get(pk=key.pk)
    if key.retired_at is not None:
        raise SigningError(SIGNING_KEY_RETIRED.format(key_id=key_id), field="key_id")
    if created:
        audit_record(actor=actor, action="signing_key.register", target=key, details={"key_id": key_id})
    if active and not key.active:
        # Deactivate the others first: the partial unique index allows one active key.
        SigningKey.objects.filter(active=True).exclude(pk=key.pk).update(active=False)
        key.active = True
        key.full_clean()
        key.save(update_fields=["active"])
        audit_record(actor=actor, action="signing_key.activate", target=key, details={"key_id": key_id})
    return key


def signing_key_register_active(*, actor: Actor = None) -> SigningKey | None:
    """Make the configured key file's public key the single active key (None: not configured).

    Earlier keys become inactive but stay accepted for verification until retired.
    """
    pair = active_signing_key_pair()
    if pair is None:
        return None
    return signing_key_register(public_key_pem=pair.public_key_pem, actor=actor, active=True)


def _signs_new_versions(key: SigningKey) -> bool:
    """Whether publishing would sign with this key: it is the configured key file's, or active."""
    try:
        pair = active_signing_key_pair()
    except SigningError:
        pair = None  # an unreadable key file signs nothing; the active flag still decides
    return key.active or (pair is not None and pair.key_id == key.key_id)


@transaction.atomic
def signing_key_retire(*, key: SigningKey, actor: Actor, force: bool = False) -> bool:
    """Withdraw a key for good; False when it was already retired.

    The key that signs new versions is refused unless `force`: once it is retired every
    publish fails until OPAMP_SIGNING_KEY_FILE holds a new key, so the refusal says so.
    Activate the next key first (its file in OPAMP_SIGNING_KEY_FILE) and the old one retires
    without `force`.
    """
    locked = SigningKey.objects.select_for_update().get(pk=key.pk)
    if locked.retired_at is None and not force and _signs_new_versions(locked):
        raise SigningError(SIGNING_KEY_IN_USE.format(key_id=key.key_id), field="force", status=409)
    moved = SigningKey.objects.filter(pk=key.pk, retired_at__isnull=True).update(
        retired_at=timezone.now(), active=False
    )
    key.refresh_from_db()
    if moved:
        audit_record(actor=actor, action="signing_key.retire", target=key, details={"key_id": key.key_id})
    return bool(moved)


def is_configured_signing_key_file(path: str | Path) -> bool:
    """Whether `path` is the file OPAMP_SIGNING_KEY_FILE names (it then becomes the active key)."""
    configured = settings.OPAMP_SIGNING_KEY_FILE
    return bool(configured) and Path(configured).resolve() == Path(path).resolve()
