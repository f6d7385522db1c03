# Config version signing moved to rollouts (rollouts 0011 takes the model over, table and
# rows unchanged).

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("signing", "0003_config_signings_from_versions"),
        ("rollouts", "0011_config_signing_in_rollouts"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="ConfigSigning")],
            database_operations=[],
        ),
    ]
