# Audit moved to fleet (fleet 0006 takes the model over, table and rows unchanged).

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("rollouts", "0009_rollout_failure_samples"),
        ("fleet", "0006_audit_event_in_fleet"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="AuditEvent")],
            database_operations=[],
        ),
    ]
