"""Config version signing: each signing of a version under its configuration's next sequence.

Signed with the configured key (`signing.signing_keys`); the result is stored as a
`ConfigSigning` and copied to `ConfigVersion.signature`, the document delivered.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import Max

from opamp.config_signature import SignedConfig
from rollouts.models import SIGNED_FOR_DELIVERY, ConfigSigning, Configuration, ConfigVersion
from signing.config_signing import sign_config
from signing.signing_keys import active_signing_key_pair, signing_key_pair_for_new_signature


def sign_delivery(
    *, configuration_name: str, sequence: int, config_hash: str, issued_at: datetime | None = None
) -> SignedConfig | None:
    """An envelope for content `config_hash` under `sequence`, signed with the configured key,
    or None when no signing key is configured. A retired key refuses to sign.

    Only signs: the sequence is allocated, and the result stored, by `config_version_sign`.
    """
    pair = signing_key_pair_for_new_signature()
    if pair is None:
        return None
    return sign_config(
        key=pair,
        config_hash_hex=config_hash,
        configuration=configuration_name,
        sequence=sequence,
        issued_at=issued_at,
    )


def _lock_configuration(configuration_id: int) -> str:
    """Take the configuration's row lock (held to commit); its name.

    Every signing of the configuration allocates its sequence under this lock, so two
    concurrent transitions never issue the same one. Publishing and the rollout
    transitions take it first, before anything else they lock.
    """
    name: str = Configuration.objects.select_for_update().values_list("name", flat=True).get(pk=configuration_id)
    return name


def _top_sequence(configuration_id: int) -> int:
    top = ConfigSigning.objects.filter(configuration_id=configuration_id).aggregate(top=Max("sequence"))["top"]
    return int(top or 0)


def config_version_sign(
    *, version: ConfigVersion, reason: str, detail: str = "", issued_at: datetime | None = None
) -> ConfigSigning | None:
    """Sign `version` under its configuration's next sequence; None without a signing key.

    The signing becomes the version's newest, the one delivered from now on (copied to
    `ConfigVersion.signature`); older signings stay valid for the agents that run them.
    Runs in the caller's transaction, under the configuration's row lock.
    """
    if active_signing_key_pair() is None:
        return None  # nothing to sign with: no query, no lock
    with transaction.atomic():
        return _sign_next(version=version, reason=reason, detail=detail, issued_at=issued_at)


def _sign_next(*, version: ConfigVersion, reason: str, detail: str, issued_at: datetime | None) -> ConfigSigning | None:
    name = _lock_configuration(version.configuration_id)
    sequence = _top_sequence(version.configuration_id) + 1
    signed = sign_delivery(
        configuration_name=name, sequence=sequence, config_hash=version.config_hash, issued_at=issued_at
    )
    if signed is None:
        return None
    document = signed.to_json_bytes().decode("ascii")
    signing = ConfigSigning.objects.create(
        configuration_id=version.configuration_id,
        version=version,
        sequence=sequence,
        key_id=signed.envelope.key_id,
        issued_at=signed.envelope.issued_at_datetime,
        document=document,
        reason=reason,
        detail=detail[:200],
    )
    ConfigVersion.objects.filter(pk=version.pk).update(signature=document)
    version.signature = document
    return signing


def config_version_sign_for_delivery(*, version_id: int, detail: str = "") -> ConfigSigning | None:
    """Make sure the signing delivered with `version_id` is its configuration's newest.

    Called by every transition that makes the version what some agents should run: those
    agents run another signing of the configuration, which is lower than the newest, so
    the version's own newest signing is fresh to them only if it is the configuration's
    newest. When it is not (another version was signed since, e.g. a candidate after the
    stable version, or the stable version after the candidate when a rollout is aborted),
    the version is signed anew under the next sequence. None: nothing was signed (already
    the newest, or no signing key configured).
    """
    if active_signing_key_pair() is None:
        return None
    with transaction.atomic():
        # Not the files: they can be megabytes, and only the hash is signed.
        version = ConfigVersion.objects.only("id", "configuration_id", "config_hash").get(pk=version_id)
        _lock_configuration(version.configuration_id)
        newest = ConfigSigning.objects.filter(version_id=version_id).aggregate(top=Max("sequence"))["top"]
        if newest is not None and newest == _top_sequence(version.configuration_id):
            return None
        return _sign_next(version=version, reason=SIGNED_FOR_DELIVERY, detail=detail, issued_at=None)
