"""Record the signatures made before signing sequences as the first signings.

Each signed version carried a format-v1 envelope whose `version` went up with every
version of its configuration, and agents remember that number as the newest they run.
Recording it as the signing's sequence makes new sequences continue above it, so every
agent accepts the next delivery and still refuses the old envelopes as replays.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django.db import migrations

BATCH = 500


def record_existing_signatures(apps: Any, schema_editor: Any) -> None:
    ConfigVersion = apps.get_model("rollouts", "ConfigVersion")
    ConfigSigning = apps.get_model("signing", "ConfigSigning")
    rows = []
    for version in ConfigVersion.objects.exclude(signature="").iterator(chunk_size=BATCH):
        try:
            envelope = json.loads(version.signature)["envelope"]
            sequence = int(envelope.get("sequence", envelope.get("version")))
            issued_at = datetime.strptime(envelope["issued_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            key_id = str(envelope["key_id"])[:16]
        except (ValueError, KeyError, TypeError):
            continue  # not a document the agents could verify either
        rows.append(
            ConfigSigning(
                configuration_id=version.configuration_id,
                version_id=version.pk,
                sequence=sequence,
                key_id=key_id,
                issued_at=issued_at,
                document=version.signature,
                reason="migrated",
                detail=f"version {version.number}",
            )
        )
        if len(rows) >= BATCH:
            ConfigSigning.objects.bulk_create(rows, ignore_conflicts=True)
            rows = []
    ConfigSigning.objects.bulk_create(rows, ignore_conflicts=True)


class Migration(migrations.Migration):
    dependencies = [("signing", "0002_config_signings")]

    operations = [migrations.RunPython(record_existing_signatures, migrations.RunPython.noop)]
