# Audit moved from rollouts to fleet, the shared base every app writes it from. The table
# keeps its name and rows: only Django's picture of which app owns the model changes.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0005_agent_sort_indexes"),
        ("rollouts", "0009_rollout_failure_samples"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="AuditEvent",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("action", models.CharField(max_length=100)),
                        ("target_type", models.CharField(max_length=100)),
                        ("target_id", models.CharField(max_length=200)),
                        ("details", models.JSONField(blank=True, default=dict)),
                        ("at", models.DateTimeField(auto_now_add=True, db_index=True)),
                        (
                            "actor",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.SET_NULL,
                                related_name="+",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                    ],
                    options={"db_table": "rollouts_auditevent", "ordering": ["-at", "-id"]},
                ),
            ],
            database_operations=[],
        ),
    ]
