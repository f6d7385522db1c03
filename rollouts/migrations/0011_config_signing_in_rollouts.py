# Config version signing moved from signing to rollouts, the app of the configurations it
# signs. The table keeps its name and rows: only Django's picture of which app owns the
# model changes (signing 0004 lets go of it).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("rollouts", "0010_audit_event_leaves_rollouts"),
        ("signing", "0003_config_signings_from_versions"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="ConfigSigning",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("sequence", models.PositiveBigIntegerField()),
                        ("key_id", models.CharField(max_length=16)),
                        ("issued_at", models.DateTimeField()),
                        ("document", models.TextField()),
                        (
                            "reason",
                            models.CharField(
                                choices=[
                                    ("publish", "published"),
                                    ("rollback", "rolled back to"),
                                    ("rollout", "made desired again"),
                                    ("migrated", "signed before sequences"),
                                ],
                                max_length=16,
                            ),
                        ),
                        ("detail", models.CharField(blank=True, max_length=200)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        (
                            "configuration",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="signings",
                                to="rollouts.configuration",
                            ),
                        ),
                        (
                            "version",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="signings",
                                to="rollouts.configversion",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "signing_configsigning",
                        "ordering": ["configuration", "-sequence"],
                        "indexes": [models.Index(fields=["version", "-sequence"], name="config_signing_version_idx")],
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("configuration", "sequence"), name="config_signing_sequence_unique"
                            )
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
